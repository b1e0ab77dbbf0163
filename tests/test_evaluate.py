"""The evaluate stage: exact chance levels, params checks, the summary table, the CLI's errors."""
import copy
import itertools
import json
import sys
import math

import numpy as np
import pytest
import yaml

from conftest import ROOT, run
from lexvla.evaluate import chance_levels, main
from lexvla.report import summarize
from lexvla.params import ParamsError, params_from_dict


def _brute_chance(t2i, n_images, ks):
    "Average hit indicators and first-hit ranks over every ordering (tiny sizes only)."
    M = len(t2i)
    out = {}
    for i in range(n_images):
        mine = {c for c in range(M) if t2i[c] == i}
        if not mine:
            continue
        firsts = [min(r for r, c in enumerate(p) if c in mine) for p in itertools.permutations(range(M))]
        for k in ks:
            out.setdefault(f"image_to_text_R@{k}", []).append(np.mean([f < k for f in firsts]))
        out.setdefault("image_to_text_mean_rank", []).append(np.mean(firsts) + 1)
    res = {k: float(np.mean(v)) for k, v in out.items()}
    perms = list(itertools.permutations(range(n_images)))
    for k in ks:  # one caption's ranking of the images; its image is 0 by symmetry
        res[f"text_to_image_R@{k}"] = float(np.mean([p.index(0) < k for p in perms]))
    res["text_to_image_mean_rank"] = float(np.mean([p.index(0) + 1 for p in perms]))
    return res


@pytest.mark.parametrize("t2i,n", [([0, 0, 1, 1, 2, 2], 3), ([0, 1, 1, 1, 2], 3), ([0, 0, 0, 1], 3)])
def test_chance_levels_equal_enumeration(t2i, n):
    "Uneven captions per image and an image without captions (skipped for image->text)."
    ks = (1, 2, 3, 7)
    got, want = chance_levels(t2i, n, ks), _brute_chance(t2i, n, ks)
    assert set(got) == set(want)
    for k in want:
        assert math.isclose(got[k], want[k], rel_tol=1e-12), (k, got[k], want[k])


def test_chance_levels_flickr_protocol():
    "1000 images x 5 captions: R@1 chance is 1/1000 (T->I) and 1-(4995/5000) (I->T)."
    t2i = np.repeat(np.arange(1000), 5)
    c = chance_levels(t2i, 1000)
    assert c["text_to_image_R@1"] == 1e-3 and c["text_to_image_R@10"] == 1e-2
    assert math.isclose(c["image_to_text_R@1"], 5 / 5000)
    assert math.isclose(c["image_to_text_R@5"], 1 - math.comb(4995, 5) / math.comb(5000, 5))
    assert math.isclose(c["image_to_text_mean_rank"], 5001 / 6)


def _params(**evaluate):
    d = yaml.safe_load((ROOT / "params.yaml").read_text())
    d["evaluate"].update(evaluate)
    return d


@pytest.mark.parametrize("change,msg", [
    ({"topks": [16, 0]}, "evaluate.topks: got 0"),
    ({"topks": [16, 16]}, "expected distinct"),
    ({"patchdis_prompt": "a photo"}, "evaluate.patchdis_prompt"),
    ({"batch_size": 0}, "evaluate.batch_size: got 0"),
    ({"split": "train"}, "evaluate.split"),
    ({"report_images": -1}, "evaluate.report_images"),
])
def test_evaluate_params_are_checked(change, msg):
    with pytest.raises(ParamsError, match=msg):
        params_from_dict(_params(**change))


def test_report_vectors_round_trip(tmp_path):
    "What the reports read back is what was above the threshold, exactly, with the plain arrays beside it."
    from lexvla.sparse import SparseVectors, load_vectors, save_vectors
    rng = np.random.default_rng(0)
    x = rng.random((5, 30)).astype(np.float32)
    f = save_vectors(tmp_path / "v.npz", {"captions": np.array(["a", "b"])},
                     {"image": SparseVectors.from_dense(x, threshold=0.7)})
    back = load_vectors(f)
    np.testing.assert_array_equal(back["image"].toarray(), x * (x > 0.7))
    assert np.array_equal(back["image"].indptr[1:] - back["image"].indptr[:-1], (x > 0.7).sum(1))
    assert list(back["captions"]) == ["a", "b"] and not list(tmp_path.glob("*.tmp*"))


def _fake_result(variant, model, r1, lexical=True):
    m = {f"{d}_R@{k}": r1 * k for d in ("image_to_text", "text_to_image") for k in (1, 5, 10)}
    r = {"variant": variant, "model": model, "lexical": lexical, "dim": 300 if lexical else 512, "n_images": 10,
         "n_captions": 50, "split": "test", "chance": chance_levels(np.repeat(np.arange(10), 5), 10), "dense": m}
    if lexical:
        r["sparsity"] = [{"name": "threshold", **{k: v / 2 for k, v in m.items()}, "image_active_words": 40.0},
                         {"name": "top512", **m, "image_active_words": 300.0}]
    r["patchdis"] = {"mIoU": r1}
    return r


def test_summary_table(tmp_path):
    ev = tmp_path / "evaluate"; ev.mkdir()
    (ev / "lexvla.json").write_text(json.dumps(_fake_result("lexvla", "lexvla", 0.1)))
    (ev / "dense.json").write_text(json.dumps(_fake_result("dense", "dense", 0.05, lexical=False)))
    s = summarize(ev, tmp_path / "out")
    assert set(s["variants"]) == {"lexvla", "dense"}
    assert s["variants"]["lexvla"]["threshold/image_to_text_R@1"] == pytest.approx(0.05)
    assert s["variants"]["lexvla"]["threshold/image_active_words"] == 40.0
    assert "threshold/image_to_text_R@1" not in s["variants"]["dense"]
    assert s["chance"]["text_to_image_R@1"] == pytest.approx(0.1)
    md = (tmp_path / "out" / "summary.md").read_text().splitlines()
    assert md[0] == "Split `test`: 10 images x 50 captions."
    assert md[2].startswith("| variant | model | regulariser | image->text R@1") and len(md) == 2 + 2 + 2 + 1 + 2
    assert s["claims"] == [] and md[-1].startswith("No claim intervals")  # no per_query.npz in this fixture
    assert s["ceiling"] is None and not any(line.startswith("Gap closed =") for line in md)  # no ceiling note
    # with an oracle ceiling: the gap each variant closes, and a ceiling row
    for v in ("lexvla", "dense"):
        r = json.loads((ev / f"{v}.json").read_text())
        r["ceiling"] = {c: 0.9 for c in ("image_to_text_R@1", "image_to_text_R@5", "text_to_image_R@1",
                                          "text_to_image_R@5")}
        (ev / f"{v}.json").write_text(json.dumps(r))
    s = summarize(ev, tmp_path / "out")
    ch = s["chance"]["text_to_image_R@1"]
    assert s["variants"]["lexvla"]["gap_closed/text_to_image_R@1"] == pytest.approx((0.1 - ch) / (0.9 - ch))
    md = (tmp_path / "out" / "summary.md").read_text().splitlines()
    assert any(l.startswith("| ceiling (oracle) | | | 0.900 | 0.900 |") for l in md), md
    assert json.loads((tmp_path / "out" / "summary.json").read_text()) == s
    with pytest.raises(FileNotFoundError, match="no <set>/<variant>.json"):
        summarize(tmp_path / "out" / "nothing", tmp_path / "x")


def test_cli_errors_name_the_problem(tmp_path, capsys):
    assert main(["--variant", "nosuch"]) == 2
    assert "train.variants: no variant 'nosuch'" in capsys.readouterr().err
    bad = tmp_path / "p.yaml"; bad.write_text(yaml.safe_dump(_params(topks=[0])))
    assert main(["--params", str(bad), "--variant", "lexvla"]) == 2
    assert "evaluate.topks" in capsys.readouterr().err
    assert main(["--params", "params.yaml", "--variant", "lexvla", "--model", str(tmp_path / "none")]) == 2
    assert "run `dvc repro train`" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--summary", str(tmp_path)])  # the summary is the report stage's


def test_cli_runs_as_module():
    r = run([sys.executable, "-m", "lexvla.evaluate", "--variant", "nosuch"], check=False)
    assert r.returncode == 2 and "no variant 'nosuch'" in r.stderr
