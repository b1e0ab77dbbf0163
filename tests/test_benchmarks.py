"""The benchmark scripts run (at tiny shapes on the CPU) and print their tables; the numbers are committed under
benchmarks/results/, not asserted here."""
import sys

from conftest import ROOT, run


def test_gpu_benchmark_runs_at_tiny_shapes_on_cpu(tmp_path):
    out = tmp_path / "gpu.md"
    run([sys.executable, str(ROOT / "benchmarks" / "bench_gpu.py"), "--shapes", "tiny", "--device", "cpu",
         "--batches", "4", "8", "--reps", "1", "--out", str(out)], timeout=300)
    rows = [l for l in out.read_text().splitlines() if l.startswith("| 4 |") or l.startswith("| 8 |")]
    assert len(rows) == 2 and all("%" in r for r in rows), out.read_text()


def test_training_step_breakdown_runs_on_the_tiny_preset(tmp_path):
    out = tmp_path / "train.md"
    run([sys.executable, str(ROOT / "benchmarks" / "bench_train.py"), "--preset", "tiny", "--batch", "8", "--reps", "1",
         "--out", str(out)], timeout=300)
    text = out.read_text()
    for part in ("vision", "text: LoRA layers", "lexical head, image", "loss", "whole step, LexVLA", "whole step, dense"):
        assert part in text, part
