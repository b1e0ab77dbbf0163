"""The training guarantees on the tiny preset: resume after SIGKILL at exact points, fingerprints, a non-finite loss,
an unwritable output, a full disk; the cached ViT equals the live one; the analysis notebooks run on their fixture.
Each stage runs as the DVC stage does, `python -m lexvla.<stage> --params params.yaml`, from a repository root (a
temporary folder with its own tiny params.yaml). `dvc repro` itself, end to end, is `test_repro.py`."""
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
    "params.yaml with the tiny preset, a dataset of 48 training images (at the preset's 32 px), and a few steps."
    p = yaml.safe_load((ROOT / "params.yaml").read_text())
    p["base"].update(device="cpu")
    p["prepare"].update(n_train=48, n_val=8, n_test=8, shard_size=24, workers=1)
    p["model"] = {"preset": "tiny"}
    tr = p["train"]
    tr.update(variants={k: tr["variants"][k] for k in variants}, steps=steps, batch_size=8, warmup_steps=2,
              reg_warmup_steps=3, checkpoint_every=2, log_every=1, num_workers=0)
    p["evaluate"].update(batch_size=8, topks=[4, 16], report_images=2)
    p["textcache"].update(batch_size=8)
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
    "prepare + textcache + imagecache on the tiny params, once for this module (in this process: the stages' own"
    " command lines run in test_repro.py)."
    from lexvla import imagecache, prepare, textcache
    root = write_root(tmp_path_factory.mktemp("tiny-repo"), tiny_params())
    here = os.getcwd()
    os.chdir(root)
    try:
        assert prepare.main(["--params", "params.yaml", "--no-progress"]) == 0
        assert textcache.main(["--params", "params.yaml"]) == 0
        assert imagecache.main(["--params", "params.yaml"]) == 0
    finally:
        os.chdir(here)
    return root


@pytest.mark.parametrize("nb", analysis_notebooks(), ids=lambda p: p.name)
def test_analysis_notebook_defaults_point_at_the_fixture(nb):
    """Opened in Jupyter, each analysis notebook reads the committed fixture (its default parameters). They are
    executed once, by the report stage of `dvc repro` in test_repro.py (with -p parameters), not a second time here."""
    src = json.loads(nb.read_text())
    cell = next(c for c in src["cells"] if "parameters" in c.get("metadata", {}).get("tags", []))
    ns: dict = {}
    exec("".join(cell["source"]), ns)  # the parameters cell is plain assignments
    for key in ("evaluate_dir", "data_dir"):
        if key in ns: assert (ROOT / ns[key]).exists(), f"{nb.name}: {key} = {ns[key]!r} does not exist"
    assert "fixtures" in str(ns.get("evaluate_dir", "")), ns


def _weights(folder: Path) -> dict:
    from safetensors.torch import load_file
    return load_file(str(folder / "model" / "weights.safetensors"))


def _train(root: Path, params: dict, name: str, out: Path, fault: str | None = None) -> int:
    "One training run as a subprocess (output to files: a killed run's loader worker may outlive it)."
    (root / f"params-{name}.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**os.environ, "PYTHONHASHSEED": "0", "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    env.pop("LEXVLA_FAULT", None)
    if fault: env["LEXVLA_FAULT"] = fault
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "stdout.txt", "w") as so, open(out / "stderr.txt", "w") as se:
        p = subprocess.Popen([sys.executable, "-m", "lexvla.train", "--params", f"params-{name}.yaml", "--variant", "lexvla",
                              "--out", str(out), "--results", str(out / "results")], cwd=root, env=env, stdout=so, stderr=se)
        return p.wait(timeout=300)


def _train_here(root: Path, params: dict, out: Path):
    "One training run in this process (the runs nobody kills)."
    from lexvla.train import train
    return train(params_from_dict(params, source="test"), "lexvla", root / "data" / "prepared", root / "data" / "textcache",
          out, out / "results", progress=False, image_cache_dir=root / "data" / "imagecache")


class _Killed(BaseException):
    "Raised at a fault point in this process: like SIGKILL for what is on disk (no handler runs; nothing is cleaned)."


# each case: one real SIGKILL (a subprocess), then two faults raised in this process; together they cover a step, a
# checkpoint's write and the moment between its rename and `latest.json`
FAULTS = {"frozen": [("save-4-weights", "sigkill"), ("step-5-backward", "raise"), ("save-6-renamed", "raise")],
          "trainable": [("step-3-backward", "sigkill"), ("save-4-weights", "raise"), ("save-6-renamed", "raise")]}


@pytest.mark.parametrize("vision", ["frozen", "trainable"])
def test_killed_runs_resume_to_the_same_weights(tiny_root, tmp_path, vision, monkeypatch):
    """After a finished run with other params (whose checkpoints hold later steps), a run is killed at exact points;
    run again each time, it ends with the uninterrupted run's weights, bit for bit, with a loader worker and with a
    frozen or a trainable ViT."""
    from lexvla import checkpoints, trainstep
    p = tiny_params(steps=8, variants=("lexvla",))
    p["train"].update(checkpoint_every=2, num_workers=1)
    if vision == "trainable":  # the ViT trains, so training images are augmented (seeded per sample and epoch)
        p["model"]["vision"] = {"frozen": False}  # merged over the tiny preset
        p["train"]["image_cache"] = False
    other = json.loads(json.dumps(p))
    other["train"].update(steps=12, lr=p["train"]["lr"] * 2)
    ref, out = tmp_path / "uninterrupted", tmp_path / "killed"
    _train_here(tiny_root, p, ref)
    _train_here(tiny_root, other, out)
    ck = out / "checkpoints"
    assert sorted(q.name for q in ck.glob("step-*")) == ["step-00000010", "step-00000012"]
    real = checkpoints.fault_point
    for point, how in FAULTS[vision]:
        if how == "sigkill":
            rc = _train(tiny_root, p, vision, out, fault=point)
            assert rc == -signal.SIGKILL, (point, rc, (out / "stderr.txt").read_text()[-3000:])
            continue
        def fault(name, point=point):
            if name == point: raise _Killed(point)
        for mod in (checkpoints, trainstep):  # a checkpoint's writes and a step's backward
            monkeypatch.setattr(mod, "fault_point", fault)
        with pytest.raises(_Killed): _train_here(tiny_root, p, out)
        for mod in (checkpoints, trainstep): monkeypatch.setattr(mod, "fault_point", real)
    # the last fault, between rename and latest.json, left step 6 complete but not named: resume from step 4
    assert json.loads((ck / "latest.json").read_text())["name"] == "step-00000004" and (ck / "step-00000006").is_dir()
    s = _train_here(tiny_root, p, out)
    assert s["steps"] == 8 and s["resumed_from"].endswith("step-00000004"), s
    wa, wb = _weights(ref), _weights(out)
    assert set(wa) == set(wb)
    different = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not different, f"resumed weights differ from the uninterrupted run: {different[:3]}"
    # only this run's newest checkpoints stay; nothing half-written or half-deleted is left
    assert sorted(q.name for q in ck.iterdir()) == ["latest.json", "step-00000006", "step-00000008"]


def test_training_in_segments_equals_one_run(tiny_root, tmp_path):
    """`train(..., stop_after=k)` pauses at step k with a checkpoint and a saved model; calls up to the horizon give
    the uninterrupted run's weights bit for bit (what experiments/convergence.py evaluates along one run)."""
    from lexvla.train import train
    p = tiny_params(steps=6, variants=("lexvla",))
    p["train"].update(checkpoint_every=4)  # the pause points 2 and 5 are not checkpoint steps of the run
    ref, seg = tmp_path / "whole", tmp_path / "segments"
    _train_here(tiny_root, p, ref)
    root = tiny_root
    for k in (2, 5, 6):
        s = train(params_from_dict(p, source="test"), "lexvla", root / "data" / "prepared", root / "data" / "textcache",
                  seg, seg / "results", progress=False, image_cache_dir=root / "data" / "imagecache", stop_after=k)
        assert s["steps"] == k, s
        if k == 2: first = _weights(seg)
    assert any(not torch.equal(first[n], v) for n, v in _weights(seg).items())  # it did train on after the pause
    wa, wb = _weights(ref), _weights(seg)
    assert [k for k in wa if not torch.equal(wa[k], wb[k])] == []


def test_fingerprint_follows_params_data_and_code(tiny_root, tmp_path):
    "A checkpoint is resumed only by the same params, data and training code: each change gives a new fingerprint."
    import shutil
    from lexvla.checkpoints import run_fingerprint
    p = tiny_params()
    data = tiny_root / "data" / "prepared"
    fp = lambda params, d=data, code=None: run_fingerprint(params_from_dict(params, source="t"), "lexvla", d, code)
    base = fp(p)
    assert fp(p) == base  # stable
    q = json.loads(json.dumps(p)); q["train"]["lr"] *= 2
    assert fp(q) != base
    q = json.loads(json.dumps(p))
    q["model"]["lora"] = {"rank": 5}  # the tiny preset's is 4
    assert fp(q) != base
    assert fp(p) != run_fingerprint(params_from_dict(p, source="t"), "dense", data)
    other = tmp_path / "prepared"
    shutil.copytree(data, other)
    assert fp(p, other) == base  # the same data elsewhere
    rep = json.loads((other / "train" / "report.json").read_text()); rep["counts"]["train"] = -1
    (other / "train" / "report.json").write_text(json.dumps(rep))
    assert fp(p, other) != base
    code = tmp_path / "lexvla"
    shutil.copytree(ROOT / "lexvla", code, ignore=shutil.ignore_patterns("__pycache__"))
    assert fp(p, code=code) == base
    (code / "losses.py").write_text((code / "losses.py").read_text() + "\n# changed\n")
    assert fp(p, code=code) != base


def test_nonfinite_loss_stops_and_keeps_the_last_checkpoint(tiny_root, tmp_path):
    from lexvla.checkpoints import Checkpointer, run_fingerprint
    from lexvla.train import train
    from lexvla.trainstep import NonFiniteLoss
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


def test_unwritable_output_is_a_clear_error(tiny_root, tmp_path, capsys, monkeypatch):
    "The command line says which folder it cannot write, and exits 2."
    from lexvla.train import main
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.chdir(tiny_root)
    assert main(["--variant", "lexvla", "--params", "params.yaml", "--out", str(blocker / "model")]) == 2
    err = capsys.readouterr().err
    assert "cannot write checkpoints" in err and str(blocker) in err, err


def test_disk_full_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    import lexvla.checkpoints as C
    from lexvla.checkpoints import CheckpointError, Checkpointer
    ck = Checkpointer(tmp_path / "ck", "fp")
    ck.check_writable()
    ck.save(2, {"w": torch.ones(3)}, {"opt": 1}, {"epoch": 0})

    def full(*a, **k): raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(C, "save_file", full)  # the checkpoint's weights write
    with pytest.raises(CheckpointError, match="disk full") as e:
        ck.save(4, {"w": torch.zeros(3)}, {"opt": 2}, {"epoch": 0})
    assert "step-00000002" in str(e.value)
    assert ck.latest().name == "step-00000002"
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["latest.json", "step-00000002"]
    monkeypatch.undo()
    t, _, info = ck.load(ck.latest())
    assert info["step"] == 2 and torch.equal(t["w"], torch.ones(3))


def test_image_cache_equals_the_live_vision_tower(tiny_root):
    "The imagecache stage's tokens give the live ViT's image and patch vectors, for training and evaluation images."
    from lexvla.pairs import train_dataset
    from lexvla.prepared import prepared_paths
    from lexvla.transforms import image_transform
    from lexvla.caches import ImageTokenCache, check_image_cache
    from lexvla.vectors import encode_images
    from lexvla.datasets import load_split
    from lexvla.model import create_model_from_params
    from lexvla.trainstep import run_precision
    params = params_from_dict(tiny_params(), source="test")
    model = create_model_from_params(params, variant="lexvla").eval()
    tf = image_transform(model.data_config, train=False)
    cache_dir = tiny_root / "data" / "imagecache"
    test = ImageTokenCache.load(cache_dir / "eval" / "seen", "test")
    check_image_cache(test, model)
    split = load_split(tiny_root / "data" / "prepared" / "eval" / "seen", "test")
    assert len(test) == len(split.images) == 8
    # each part is computed at the precision of the run that reads it, as this machine resolves it
    assert test.meta["precision"] == ("bf16" if run_precision(params, "eval", "cpu") == "bf16" else "fp32")
    amp = test.meta["precision"] == "bf16"
    for patches in (False, True):
        live = encode_images(model, split.images, tf, 4, patches=patches, amp=amp)
        cached = encode_images(model, split.images, tf, 4, patches=patches, cache=test, amp=amp)
        torch.testing.assert_close(cached, live, atol=1e-5, rtol=1e-5)
    train = ImageTokenCache.load(cache_dir / "train", "train")
    assert train.meta["precision"] == ("bf16" if run_precision(params, "train", "cpu") == "bf16" else "fp32")
    ds = train_dataset(prepared_paths(tiny_root / "data" / "prepared", "train")["shards"], tf, seed=0)
    assert train.keys == ds.keys and len(train) == 48
    s = ds.load(5)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=train.meta["precision"] == "bf16"):
        torch.testing.assert_close(model.encode_image(tokens=train.lookup([s["key"]])),
                                   model.encode_image(s["pixels"][None]), atol=1e-5, rtol=1e-5)
    other = create_model_from_params(params, variant="lexvla", seed=3)  # another random frozen ViT
    with pytest.raises(ValueError, match="rebuild it"): check_image_cache(test, other)


def test_near_uniform_caption_vectors_stop_training(tiny_root, tmp_path):
    "train.uniform_cosine (the paper profile's 0.95): the tiny random LM's caption vectors (cosine ~0.998) stop the run."
    from lexvla.trainstep import NearUniformVectors
    p = tiny_params(steps=4, variants=("lexvla",))
    p["train"].update(uniform_cosine=0.95, log_every=2)
    with pytest.raises(NearUniformVectors, match="model.logit_shift.text and .image to mean"):
        _train_here(tiny_root, p, tmp_path / "out")
