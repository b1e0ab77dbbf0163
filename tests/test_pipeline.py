"""The pipeline end to end on the tiny preset, and the training guarantees of issue 5 (resume after SIGKILL, non-finite
loss, unwritable output, full disk). Each stage runs as the DVC stage does: `python -m lexvla.<stage> --params
params.yaml` from a repository root (here a temporary folder with its own tiny params.yaml)."""
import dataclasses
import errno
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import BIN, ROOT, analysis_notebooks, run, tool

from lexvla.params import params_from_dict


def tiny_params(steps: int = 6, variants=("lexvla", "dense")) -> dict:
    "params.yaml with the tiny preset, a 32 px dataset of 48 training images, and a few steps."
    from lexvla.model import model_config
    p = yaml.safe_load((ROOT / "params.yaml").read_text())
    p["base"].update(device="cpu")
    p["prepare"].update(image_size=32, n_train=48, n_val=8, n_test=8, shard_size=24, workers=1)
    p["model"] = dataclasses.asdict(model_config("tiny"))
    tr = p["train"]
    tr.update(variants={k: tr["variants"][k] for k in variants}, steps=steps, batch_size=8, warmup_steps=2,
              reg_warmup_steps=3, checkpoint_every=2, log_every=1, num_workers=0)
    p["evaluate"].update(batch_size=8, topks=[4, 16], report_images=2)
    p["report"].update(n_examples=2, n_hits=2, words_per_cloud=10, n_overused=5, topk=16)
    return p


def write_root(folder: Path, params: dict) -> Path:
    "A repository root for the stages: pyproject.toml (the marker) and params.yaml."
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "pyproject.toml").write_text("# test repository root\n")
    (folder / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return folder


def stage(root: Path, module: str, *args, timeout=600, check=True):
    return run([sys.executable, "-m", f"lexvla.{module}", "--params", "params.yaml", *args], cwd=root,
               timeout=timeout, check=check)


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    "prepare + textcache + imagecache on the tiny params, once for this module."
    root = write_root(tmp_path_factory.mktemp("tiny-repo"), tiny_params())
    stage(root, "prepare", "--no-progress")
    stage(root, "textcache")
    stage(root, "imagecache")
    return root


def test_pipeline_end_to_end(tiny_root):
    "train -> evaluate -> report on two variants; the analysis notebooks run through papermill on the results."
    root = tiny_root
    for v in ("lexvla", "dense"):
        stage(root, "train", "--variant", v)
        assert (root / "models" / v / "model" / "weights.safetensors").is_file()
        s = json.loads((root / "results" / "train" / v / "summary.json").read_text())
        assert s["steps"] == 6 and math.isfinite(s["final_loss"]["loss"])
        rec = json.loads((root / "results" / "train" / v / "params.resolved.json").read_text())
        assert rec["params"]["train"]["steps"] == 6 and rec["environment"]["device"] == "cpu"
        # the dvclive metrics the dvc.yaml plots declare
        assert (root / "results" / "train" / v / "live" / "plots" / "metrics" / "train" / "loss.tsv").is_file()
        stage(root, "evaluate", "--variant", v)
        r = json.loads((root / "results" / "evaluate" / f"{v}.json").read_text())
        assert r["n_images"] == 8 and r["n_captions"] == 40
        assert 0 <= r["dense"]["image_to_text_R@1"] <= 1 and "patchdis" in r
        assert 0 <= r["patchdis"]["mIoU"] <= 1
        assert ("sparsity" in r) == (v != "dense")
    # DVC re-runs a finished stage after removing its outputs (its checkpoints persist): the run trains again,
    # rebuilds its metrics and reaches the same weights
    before = _weights(root / "models" / "dense")
    import shutil
    shutil.rmtree(root / "results" / "train" / "dense")
    stage(root, "train", "--variant", "dense")
    assert (root / "results" / "train" / "dense" / "live" / "plots" / "metrics" / "train" / "loss.tsv").is_file()
    after = _weights(root / "models" / "dense")
    assert all(torch.equal(before[k], after[k]) for k in before)
    lex = json.loads((root / "results" / "evaluate" / "lexvla.json").read_text())
    assert [s["name"] for s in lex["sparsity"]] == ["threshold", "top4", "top16"]
    assert lex["text_encoding"] == "text cache" and lex["image_encoding"] == "image cache"
    # the search stage: test-image vectors into milvus-lite, every top-k equal to brute force; run twice (idempotent)
    for _ in range(2):
        stage(root, "milvus")
        srch = json.loads((root / "results" / "search" / "summary.json").read_text())
        assert srch["embedded"] and srch["stored"] == 8 and srch["topk_equals_brute_force"] == 1.0, srch
    assert srch["ingest"] == {"written": 0, "skipped": 8}
    assert (root / "results" / "search" / "export" / "impact.jsonl").is_file()
    out = root / "results" / "reports"
    run([sys.executable, "-m", "lexvla.evaluate", "--summary", "results/evaluate", "--out", "results/reports"], cwd=root)
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["variants"]) == {"lexvla", "dense"}
    for nb in analysis_notebooks():
        run([tool("papermill"), "-k", "lexvla", str(nb), str(out / nb.name), "-p", "evaluate_dir", "results/evaluate",
             "-p", "data_dir", "data/prepared", "-p", "figures_dir", "results/reports/figures"], cwd=root, timeout=600)
    pngs = sorted(p.name for p in (out / "figures").glob("*.png"))
    assert len(pngs) >= 5, pngs


@pytest.mark.parametrize("nb", analysis_notebooks(), ids=lambda p: p.name)
def test_analysis_notebook_runs_on_its_fixture(nb, tmp_path):
    "Each analysis notebook, with its default parameters (the committed fixture), runs through papermill."
    assert (ROOT / "tests" / "fixtures" / "report" / "evaluate").is_dir(), "run tests/fixtures/make_report_fixture.py"
    run([tool("papermill"), "-k", "lexvla", str(nb), str(tmp_path / nb.name)], cwd=ROOT, timeout=600)


def _weights(folder: Path) -> dict:
    from safetensors.torch import load_file
    return load_file(str(folder / "model" / "weights.safetensors"))


def test_sigkill_resume_reaches_the_same_weights(tiny_root, tmp_path):
    "A run killed with SIGKILL after its first checkpoint, run again, ends with the uninterrupted run's weights."
    params = tiny_params(steps=12, variants=("lexvla",))
    params["train"]["checkpoint_every"] = 3
    (tiny_root / "params-resume.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    common = ["--params", "params-resume.yaml", "--variant", "lexvla"]
    a, b = tmp_path / "a", tmp_path / "b"
    run([sys.executable, "-m", "lexvla.train", *common, "--out", str(a), "--results", str(a / "results")], cwd=tiny_root)

    env = {**os.environ, "PYTHONHASHSEED": "0", "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.Popen([sys.executable, "-m", "lexvla.train", *common, "--out", str(b), "--results", str(b / "results")],
                            cwd=tiny_root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latest, deadline = b / "checkpoints" / "latest.json", time.time() + 300
    while not latest.is_file():
        assert proc.poll() is None, "the run ended before its first checkpoint"
        assert time.time() < deadline, "no checkpoint within 300 s"
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL); proc.wait()
    assert proc.returncode == -signal.SIGKILL
    killed_at = json.loads(latest.read_text())["step"]
    assert killed_at < 12 and not (b / "model" / "weights.safetensors").is_file(), "the run finished before the kill"

    r = run([sys.executable, "-m", "lexvla.train", *common, "--out", str(b), "--results", str(b / "results")], cwd=tiny_root)
    s = json.loads(r.stdout.strip().splitlines()[-1])
    assert s["resumed_from"] and s["steps"] == 12
    wa, wb = _weights(a), _weights(b)
    assert set(wa) == set(wb)
    different = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not different, f"resumed weights differ from the uninterrupted run: {different[:3]}"


def test_nonfinite_loss_stops_and_keeps_the_last_checkpoint(tiny_root, tmp_path):
    from lexvla.train import Checkpointer, NonFiniteLoss, run_fingerprint, train
    params = params_from_dict(tiny_params(steps=8, variants=("lexvla",)), source="test")

    def poison(step, parts):
        if step == 5: parts["loss"] = parts["loss"] * float("nan")

    with pytest.raises(NonFiniteLoss) as e:
        train(params, "lexvla", tiny_root / "data" / "prepared", tiny_root / "data" / "textcache", tmp_path / "m",
              tmp_path / "r", progress=False, loss_hook=poison, image_cache_dir=tiny_root / "data" / "imagecache")
    msg = str(e.value)
    assert "non-finite loss at step 5" in msg and "step-00000004" in msg, msg
    ck = Checkpointer(tmp_path / "m" / "checkpoints", run_fingerprint(params, "lexvla", tiny_root / "data" / "prepared"))
    last = ck.latest()
    assert last is not None and last.name == "step-00000004"
    tensors, _, info = ck.load(last)
    assert info["step"] == 4 and all(torch.isfinite(t).all() for t in tensors.values())
    assert not (tmp_path / "m" / "model" / "weights.safetensors").exists()


def test_unwritable_output_is_a_clear_error(tiny_root, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    r = run([sys.executable, "-m", "lexvla.train", "--variant", "lexvla", "--params", "params.yaml",
             "--out", str(blocker / "model")], cwd=tiny_root, check=False)
    assert r.returncode == 2
    assert "cannot write checkpoints" in r.stderr and str(blocker) in r.stderr, r.stderr


def test_disk_full_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    import safetensors.torch
    from lexvla.train import CheckpointError, Checkpointer
    ck = Checkpointer(tmp_path / "ck", "fp")
    ck.check_writable()
    ck.save(2, {"w": torch.ones(3)}, {"opt": 1}, {"epoch": 0})

    def full(*a, **k): raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(safetensors.torch, "save_file", full)
    with pytest.raises(CheckpointError, match="disk full") as e:
        ck.save(4, {"w": torch.zeros(3)}, {"opt": 2}, {"epoch": 0})
    assert "step-00000002" in str(e.value)
    assert ck.latest().name == "step-00000002"
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["latest.json", "step-00000002"]
    monkeypatch.undo()
    t, _, info = ck.load(ck.latest())
    assert info["step"] == 2 and torch.equal(t["w"], torch.ones(3))


def test_same_params_same_weights(tiny_root, tmp_path):
    "Two runs of the same params on this machine give bit-identical weights."
    args = ["--variant", "lexvla", "--params", "params.yaml"]
    for d in ("x", "y"):
        run([sys.executable, "-m", "lexvla.train", *args, "--out", str(tmp_path / d), "--results", str(tmp_path / d / "r")],
            cwd=tiny_root)
    wx, wy = _weights(tmp_path / "x"), _weights(tmp_path / "y")
    assert all(torch.equal(wx[k], wy[k]) for k in wx)


def test_image_cache_equals_the_live_vision_tower(tiny_root):
    "The imagecache stage's tokens give the live ViT's image and patch vectors, for training and evaluation images."
    from lexvla.datasets import image_transform, prepared_paths, train_dataset
    from lexvla.evaluate import encode_images, load_split
    from lexvla.imagecache import ImageTokenCache, check_image_cache
    from lexvla.model import create_model_from_params
    params = params_from_dict(tiny_params(), source="test")
    model = create_model_from_params(params, variant="lexvla").eval()
    tf = image_transform(model.data_config, train=False)
    cache_dir = tiny_root / "data" / "imagecache"
    test = ImageTokenCache.load(cache_dir, "test")
    check_image_cache(test, model)
    split = load_split(tiny_root / "data" / "prepared", "test")
    assert len(test) == len(split.images) == 8
    for patches in (False, True):
        live = encode_images(model, split.images, tf, 4, patches=patches)
        cached = encode_images(model, split.images, tf, 4, patches=patches, cache=test)
        torch.testing.assert_close(cached, live, atol=1e-5, rtol=1e-5)
    train = ImageTokenCache.load(cache_dir, "train")
    ds = train_dataset(prepared_paths(tiny_root / "data" / "prepared")["shards"], tf, seed=0)
    assert train.keys == ds.keys and len(train) == 48
    s = ds.load(5)
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(tokens=train.lookup([s["key"]])),
                                   model.encode_image(s["pixels"][None]), atol=1e-5, rtol=1e-5)
    other = create_model_from_params(params, variant="lexvla", seed=3)  # another random frozen ViT
    with pytest.raises(ValueError, match="rebuild it"): check_image_cache(test, other)
