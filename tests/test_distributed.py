"""Training in several processes equals training in one (issue 13), checked on the CPU with 2 gloo processes:

- one step of 2 x B/2 with gathered features has the loss and the gradients of 1 x B, with the global and the local
  form of the loss (tests/distributed_step.py, under `accelerate launch`);
- `python -m lexvla.train` with `train.num_processes: 2` re-launches itself with accelerate; its learning rate at
  every step is the 1-process run's, and its weights after a short run are close to the 1-process run's."""
import csv
import json
import os
import sys
from pathlib import Path

import pytest
import torch
from conftest import BIN, ROOT, run
from test_pipeline import tiny_params, write_root

from lexvla.train import launch_command


@pytest.mark.parametrize("local_loss", [False, True], ids=["global", "local"])
def test_gathered_step_equals_one_process(tmp_path, local_loss):
    out = tmp_path / "step.json"
    cmd = launch_command([], 2)
    cmd = cmd[:cmd.index("-m", 3)] + [str(ROOT / "tests" / "distributed_step.py"), str(out)]
    run(cmd + (["--local-loss"] if local_loss else []), cwd=tmp_path, timeout=300)
    r = json.loads(out.read_text())
    assert r["processes"] == 2 and not r["missing"]
    assert r["loss"] == pytest.approx(r["ref_loss"], rel=1e-6)
    # fp32: the sums run in another order, nothing else differs. A reordered fp32 sum errs relative to its terms, not
    # to its result: the logit scale's gradient is a near-cancelling sum of O(1) terms (1e-5 out of terms of ~1;
    # measured 2.3e-7 apart on a 2-core AVX2 EPYC), hence the absolute floor of ~10 fp32 ulps of 1 (a dropped or
    # doubled process part moves the other gradients by far more than the relative bound).
    for k, d in r["grad_max_diff"].items():
        assert d <= 1e-5 * max(r["grad_max"][k], 1e-3) + 1e-6, (k, d, r["grad_max"][k])
    assert any(v > 0 for v in r["grad_max"].values())
    assert r["broadcast_buffers"] is False  # the frozen text codebook is not sent on every forward


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    "prepare + both caches for a tiny params file whose runs are comparable across process counts (fp32, no dropout)."
    p = tiny_params(steps=6, variants=("lexvla",))
    p["train"].update(precision="fp32", batch_size=8, checkpoint_every=3, log_every=1)
    root = write_root(tmp_path_factory.mktemp("dist-repo"), p)
    for stage in ("prepare", "textcache", "imagecache"):
        run([sys.executable, "-m", f"lexvla.{stage}", "--params", "params.yaml"], cwd=root, timeout=600)
    return root, p


def _run(root: Path, params: dict, name: str, processes: int, fault: str | None = None, **train) -> Path:
    "`python -m lexvla.train` on `params` with `train.num_processes: processes` (and `train` keys changed)."
    import yaml
    params = json.loads(json.dumps(params))
    params["train"].update(num_processes=processes, **train)
    (root / f"params-{name}.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = root / "runs" / name
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    for k in ("LOCAL_RANK", "ACCELERATE_LAUNCHED", "WORLD_SIZE", "RANK", "LEXVLA_FAULT"): env.pop(k, None)
    if fault: env["LEXVLA_FAULT"] = fault
    r = run([sys.executable, "-m", "lexvla.train", "--params", f"params-{name}.yaml", "--variant", "lexvla",
             "--out", str(out), "--results", str(out / "results")], cwd=root, timeout=600, env=env, check=not fault)
    if fault: assert r.returncode != 0, "the fault point was not reached"
    return out


def _lrs(out: Path) -> list[tuple[int, float]]:
    with open(out / "results" / "live" / "plots" / "metrics" / "train" / "lr.tsv") as f:
        return [(int(r["step"]), float(r["lr"])) for r in csv.DictReader(f, delimiter="\t")]


def test_two_processes_train_like_one(tiny_data):
    from safetensors.torch import load_file
    root, p = tiny_data
    one, two = _run(root, p, "one", 1), _run(root, p, "two", 2)
    lr1, lr2 = _lrs(one), _lrs(two)
    assert len(lr1) == p["train"]["steps"] and lr2 == lr1  # the same schedule, step by step (not N x faster)
    assert max(lr for _, lr in lr1) == pytest.approx(p["train"]["lr"])
    w1, w2 = (load_file(str(o / "model" / "weights.safetensors")) for o in (one, two))
    assert set(w1) == set(w2)
    for k in w1:
        assert torch.allclose(w1[k], w2[k], rtol=1e-3, atol=1e-5), (k, float((w1[k] - w2[k]).abs().max()))
    state = json.loads(next((two / "checkpoints").glob("step-*/state.json")).read_text())
    assert state["processes"] == 2
    s1, s2 = (json.loads((o / "results" / "summary.json").read_text())["final_loss"]["loss"] for o in (one, two))
    assert s2 == pytest.approx(s1, rel=1e-4)


def test_streaming_loader_resumes_to_the_same_weights(tiny_data):
    """`train.loader: streaming` (the CC-12M loader): a run killed mid-step after its step-3 checkpoint, then run
    again, ends with the weights of an uninterrupted run, bit for bit; with 2 processes, each keeps its own place."""
    from safetensors.torch import load_file
    root, p = tiny_data
    full = _run(root, p, "stream-full", 1, loader="streaming")
    _run(root, p, "stream-cut", 1, fault="step-5-backward", loader="streaming")
    cut = _run(root, p, "stream-cut", 1, loader="streaming")
    w1, w2 = (load_file(str(o / "model" / "weights.safetensors")) for o in (full, cut))
    assert set(w1) == set(w2) and all(torch.equal(w1[k], w2[k]) for k in w1)
    two = _run(root, p, "stream-two", 2, loader="streaming")
    state = json.loads(next((two / "checkpoints").glob("step-*/state.json")).read_text())
    assert [s["rank"] for s in state["stream"]] == [0, 1] and state["processes"] == 2
