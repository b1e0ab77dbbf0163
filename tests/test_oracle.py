"""lexvla.oracle: own captions always fit their scene, wrong ones do not, and the tie formulas match brute force."""
import itertools
import json

import numpy as np
import pytest

from lexvla import oracle as O
from lexvla.karpathy import karpathy_entry
from lexvla.metrics import retrieval_metrics
from lexvla.runtime import write_json
from lexvla.scenes import COLOURS, SHAPES, make_scene, scene_rng


def scenes(n, size, split="test", seed=0):
    return [make_scene(scene_rng(seed, split, i), size, 1, 4, 5) for i in range(n)]


# ---- the oracle's correctness check --------------------------------------------------------------------------

@pytest.mark.parametrize("size,split", [(112, "test"), (64, "val")])
def test_own_captions_always_fit(size, split):
    sc = scenes(400, size, split)
    metas = [json.loads(json.dumps(s.meta())) for s in sc]  # the form prepare writes
    bad = [(c, O.parse_caption(c)) for m in metas for c in m["captions"] if not O.caption_fits(c, m, size)]
    assert not bad, bad[:5]
    caps = [c for m in metas for c in m["captions"]]
    fit = O.oracle_scores(metas, caps, size, posterior=False)
    t2i = np.repeat(np.arange(len(metas)), 5)
    assert fit.shape == (len(metas), len(caps)) and fit[t2i, np.arange(len(caps))].min() == 1.0
    assert set(np.unique(fit)) <= {0.0, 1.0}


def test_every_caption_gives_claims():
    for s in scenes(200, 112):
        for c in s.captions:
            claims = O.parse_caption(c)
            assert claims, c
            if " background" in c: assert any(isinstance(x, O.OnBackground) and x.kind == s.background for x in claims)


def test_scores_agree_with_caption_fits():
    sc = scenes(40, 112)
    caps = [c for s in sc for c in s.captions]
    fit = O.oracle_scores(sc, caps, 112, posterior=False)
    ref = np.array([[O.caption_fits(c, s, 112) for c in caps] for s in sc])
    assert np.array_equal(fit > 0, ref)
    post = O.oracle_scores(sc, caps, 112)
    assert np.allclose(post, fit / fit.sum(0)) and np.allclose(post.sum(0), 1)


# ---- what the claims say ---------------------------------------------------------------------------------------

def obj(shape, colour, size, cx, cy):
    return {"shape": shape, "colour": colour, "size": size, "cx": cx, "cy": cy}


# a red circle on the left, a blue star on the right (both in the middle row), a plain background; 100 px
TWO = {"background": "plain", "objects": [obj("circle", "red", "small", 20, 50), obj("star", "blue", "large", 80, 50)]}


@pytest.mark.parametrize("caption,fits", [
    ("a tiny scarlet disk and a huge cobalt star", True),
    ("a picture of a blue star and a red circle", True),
    ("a red circle", False),                           # an inventory names every object
    ("a red circle and a green star", False),          # wrong colour
    ("a red square and a blue star", False),           # wrong shape
    ("a large red circle and a blue star", False),     # wrong size
    ("two red circles and a blue star", False),        # wrong count
    ("a red circle to the left of a blue star", True),
    ("a red circle left of a star", True),             # the second object's colour is optional
    ("a blue star to the left of a red circle", False),
    ("a blue star right of a circle", True),
    ("a red circle above a blue star", False),
    ("a red circle on the left", True),
    ("a red circle on the right", False),
    ("a blue star on the right", True),
    ("a blue star in the middle", False),
    ("two shapes with a circle and a star", True),
    ("two shapes with two circles", False),
    ("three shapes with a circle, a star and a heart", False),
    ("a single red circle", False),
    ("a red circle and a blue star on a plain background", True),
    ("a red circle and a blue star on a striped background", False),
])
def test_hand_made_scene(caption, fits):
    assert O.caption_fits(caption, TWO, 100) == fits, O.parse_caption(caption)


def test_relation_threshold_is_the_generators():
    near = {"background": "noise",
            "objects": [obj("heart", "pink", "medium", 40, 50), obj("ring", "black", "medium", 54, 50)]}
    assert not O.caption_fits("a pink heart left of a ring", near, 100)  # 14 px < 0.15 x 100: no clear relation
    assert O.caption_fits("a pink heart left of a ring", near, 90)       # 14 px > 13.5
    assert O.caption_fits("a rose heart, a medium dark ring", near, 100)  # unknown word `medium` is ignored


def test_changed_colour_or_shape_does_not_fit():
    for s in scenes(100, 112):
        o = s.objects[0]
        colours, shapes = {x.colour for x in s.objects}, {x.shape for x in s.objects}
        c_abs = next(c for c in COLOURS if c not in colours)
        s_abs = next(x for x in SHAPES if x not in shapes)
        for cap in (f"a {c_abs} {o.shape} in the middle", f"a {o.colour} {s_abs} in the middle",
                    f"a {c_abs} {o.shape}", f"a single {o.colour} {s_abs}",
                    f"a {o.colour} {o.shape} right of a {c_abs} {s_abs}"):
            assert not O.caption_fits(cap, s, 112), (cap, s.captions)
        inv = s.captions[0]  # the inventory; one colour word swapped for an absent colour
        word = next(w for w in inv.replace(",", " ").split() if w in O._COLOUR_WORDS)
        assert not O.caption_fits(inv.replace(f" {word} ", f" {c_abs} ", 1), s, 112)


# ---- expected recall with random tie-breaking --------------------------------------------------------------

def brute_expected(sim, t2i, ks):
    "Average the hit indicators over every tie-breaking order (all permutations of captions / of images)."
    n_img, n_txt = sim.shape
    hits = {f"image_to_text_R@{k}": [] for k in ks} | {f"text_to_image_R@{k}": [] for k in ks}
    for i in range(n_img):
        caps = {j for j in range(n_txt) if t2i[j] == i}
        if not caps: continue
        per_k = {k: [] for k in ks}
        for perm in itertools.permutations(range(n_txt)):
            order = sorted(range(n_txt), key=lambda j: (-sim[i, j], perm[j]))
            first = min(order.index(j) for j in caps) + 1
            for k in ks: per_k[k].append(first <= k)
        for k in ks: hits[f"image_to_text_R@{k}"].append(np.mean(per_k[k]))
    for j in range(n_txt):
        per_k = {k: [] for k in ks}
        for perm in itertools.permutations(range(n_img)):
            order = sorted(range(n_img), key=lambda i: (-sim[i, j], perm[i]))
            for k in ks: per_k[k].append(order.index(t2i[j]) + 1 <= k)
        for k in ks: hits[f"text_to_image_R@{k}"].append(np.mean(per_k[k]))
    return {k: float(np.mean(v)) for k, v in hits.items()}


@pytest.mark.parametrize("trial", range(3))
def test_tie_formulas_exact(trial):
    rng = np.random.default_rng(trial)
    t2i = np.array([0, 0, 0, 1, 1, 3, 3])  # image 2 has no caption
    sim = rng.integers(0, 3, size=(4, 7)).astype(np.float64)
    ks = (1, 2, 3, 5)
    got, ref = O.oracle_ceiling(sim, t2i, ks), brute_expected(sim, t2i, ks)
    assert got.keys() == ref.keys() and all(abs(got[k] - ref[k]) < 1e-12 for k in ref), (got, ref)


def test_tie_formulas_monte_carlo():
    rng = np.random.default_rng(7)
    t2i = rng.integers(0, 10, size=30)
    sim = rng.integers(0, 2, size=(10, 30)).astype(np.float64)
    exact = O.oracle_ceiling(sim, t2i)
    runs = [retrieval_metrics(sim + 1e-3 * rng.random(sim.shape), t2i) for _ in range(3000)]
    for k, v in exact.items(): assert abs(v - np.mean([r[k] for r in runs])) < 0.02, k
    pess = retrieval_metrics(sim, t2i)
    assert all(pess[k] <= v + 1e-12 for k, v in exact.items())


def test_tie_closed_forms():
    # text->image: clip(K - g, 0, t + 1) / (t + 1); no ties: a plain hit or miss
    g, t = np.array([0, 0, 3, 9, 2]), np.array([0, 9, 4, 0, 1])
    for k in (1, 5, 10):
        assert np.allclose(O.tied_hit_probability(g, t + 1, 1, k), np.clip(k - g, 0, t + 1) / (t + 1))
    # image->text: 5 positives among 11 tied at the top, K = 1: 5/11; K = 2: 1 - (6/11)(5/10)
    assert np.isclose(O.tied_hit_probability(0, 11, 5, 1), 5 / 11)
    assert np.isclose(O.tied_hit_probability(0, 11, 5, 2), 1 - 6 / 11 * 5 / 10)
    assert O.tied_hit_probability(0, 11, 5, 7) == 1.0  # 7 draws from 6 non-positives must hit


def test_ceiling_accepts_torch_and_checks_shapes():
    torch = pytest.importorskip("torch")
    a = O.oracle_ceiling(torch.eye(3), torch.arange(3))
    assert all(v == 1.0 for v in a.values())
    with pytest.raises(ValueError): O.oracle_ceiling(np.eye(3), np.arange(4))
    with pytest.raises(ValueError): O.oracle_ceiling(np.eye(3), np.array([0, 1, 5]))


# ---- a prepared split ------------------------------------------------------------------------------------------

def test_scene_oracle(tmp_path):
    metas = [s.meta() for s in scenes(25, 112)]
    (tmp_path / "karpathy" / "images").mkdir(parents=True)
    entries = [karpathy_entry(i, f"test_{i:06d}.jpg", "test", m["captions"], 5 * i) for i, m in enumerate(metas)]
    write_json(tmp_path / "karpathy" / "dataset_embedded.json", {"images": entries, "dataset": "embedded"})
    assert O.scene_oracle(tmp_path, "test") is None  # real data: no scene file, no oracle
    write_json(tmp_path / "scenes" / "test.json", {"size": 112, "scenes": metas})
    r = O.scene_oracle(tmp_path, "test")
    assert r["own_caption_fit_rate"] == 1.0 and r["n_images"] == 25 and r["n_captions"] == 125 and r["size"] == 112
    assert list(r["ceiling"]) == [f"{d}_R@{k}" for d in ("image_to_text", "text_to_image") for k in (1, 5, 10)]
    assert r["mean_fitting_images_per_caption"] >= 1 and 0 < r["unique_caption_fraction"] <= 1
    assert all(r["ceiling_fit_only"][k] <= r["ceiling"][k] + 1e-12 for k in r["ceiling"])
    write_json(tmp_path / "scenes" / "test.json", {"size": 112, "scenes": metas[::-1]})
    with pytest.raises(ValueError, match="differ"): O.scene_oracle(tmp_path, "test")
