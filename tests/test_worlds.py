"""The data worlds (`lexvla.worlds`): the pictograms world's determinism, its seen/unseen split, its masks and its
oracle; the shapes world's bytes; how `prepare` draws each evaluated set from its concept pool."""
import hashlib
import json
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import ROOT
from lexvla import pictograms as P
from lexvla.decode import DataConfigError
from lexvla.karpathy import load_karpathy
from lexvla.masks import load_masks
from lexvla.prepared import eval_set_paths
from lexvla.params import load_params
from lexvla.prepare import _render, prepare
from lexvla.worlds import WORLDS, WorldConfig, get_world, world_oracle

CFG = WorldConfig(112)


def pictogram_params(d: Path, **over) -> Path:
    "params.yaml (the pictograms default) with a small prepare section, written to `d`."
    y = yaml.safe_load((ROOT / "params.yaml").read_text())
    y["prepare"].update({"n_train": 40, "n_val": 6, "n_test": 8, "shard_size": 20, "workers": 0, **over})
    d.mkdir(parents=True, exist_ok=True)
    (d / "params.yaml").write_text(yaml.safe_dump(y))
    return d / "params.yaml"


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    "A prepared pictograms dataset: 300 training scenes, the seen and unseen sets (6 val + 8 test each)."
    d = tmp_path_factory.mktemp("pictograms")
    params = load_params(pictogram_params(d, n_train=300, shard_size=100))
    return d / "out", prepare(params, d / "out", progress=False)


def _hash_scenes(n: int = 6) -> str:
    h = hashlib.sha256()
    for pool, split in (("train", "train"), ("seen", "val"), ("unseen", "test")):
        for i in range(n):
            r = _render(("pictograms", CFG, 0, split, i, pool, 95))
            for k in ("jpg", "semantic", "panoptic"): h.update(r[k])
            h.update(json.dumps([r["meta"], r["segments"]], sort_keys=True).encode())
    return h.hexdigest()


def test_pictograms_are_byte_deterministic():
    "A scene is a function of (seed, split, index, pool): the same bytes twice, and in a fresh process."
    code = "import sys; sys.path.insert(0, 'tests'); from test_worlds import _hash_scenes; print(_hash_scenes())"
    other = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert _hash_scenes() == _hash_scenes() == other.stdout.strip()
    a, b = (_render(("pictograms", CFG, 0, "val", 3, pool, 95))["jpg"] for pool in ("seen", "unseen"))
    assert a != b  # another pool, another scene


def test_prepare_writes_the_same_bytes_with_any_workers(tmp_path):
    outs = {}
    for w in (0, 2):
        prepare(load_params(pictogram_params(tmp_path / f"p{w}", workers=w)), tmp_path / f"o{w}", progress=False)
        outs[w] = {str(p.relative_to(tmp_path / f"o{w}")): hashlib.sha256(p.read_bytes()).hexdigest()
                   for p in sorted((tmp_path / f"o{w}").rglob("*")) if p.is_file() and p.name != "params.resolved.json"}
    assert outs[0] == outs[2] and "eval/unseen/concepts.json" in outs[0]


def test_the_shapes_world_draws_the_bytes_it_always_drew():
    """The shapes world through the registry: the same image, masks, captions and segments as `prepare` drew before
    worlds existed (sha256 of 36 scenes rendered by commit dd66766's `prepare._render`)."""
    h = hashlib.sha256()
    for split in ("train", "val", "test"):
        for i in range(12):
            r = _render(("shapes", CFG, 0, split, i, "train" if split == "train" else "all", 95))
            for k in ("jpg", "semantic", "panoptic"): h.update(r[k])
            h.update(json.dumps(r["meta"], sort_keys=True).encode())
            h.update(json.dumps(r["segments"], sort_keys=True).encode())
    assert h.hexdigest() == "27a7d997afe7ef51e889ae76ae4c09880448b93109fee91daa7659b169dbaae2"


def test_the_concepts():
    "At least 1,500 concepts with distinct names; about a fifth held out in every Unicode group."
    cs = P.load_concepts()
    assert len(cs) >= 1500 and len({c.name for c in cs}) == len(cs) and [c.id for c in cs] == list(range(1, len(cs) + 1))
    for g in {c.group for c in cs}:
        members = [c for c in cs if c.group == g]
        assert 0.1 <= sum(not c.seen for c in members) / len(members) <= 0.25, g
    names = {c.name for c in cs}
    assert {"strawberry", "hiking boot", "tractor", "flag of japan"} <= names
    assert not any("skin tone" in n or "o'clock" in n or n.endswith(" button") for n in names)


def _said(text: str, phrase: str) -> bool:
    return f" {phrase} " in " " + " ".join(re.findall(r"[a-z'-]+", text.lower())) + " "


def test_no_unseen_concept_reaches_training(prepared):
    "No training image draws an unseen concept and no training caption names one (singular or plural)."
    out, _ = prepared
    cs = P.load_concepts()
    unseen = [c for c in cs if not c.seen]
    n = 0
    for shard in sorted((out / "train").glob("*.tar")):
        with tarfile.open(shard) as tf:
            for m in tf.getmembers():
                if not m.name.endswith(".json"): continue
                meta = json.loads(tf.extractfile(m).read())
                assert all(cs[o["concept"] - 1].seen for o in meta["objects"]), meta["objects"]
                for cap in meta["captions"]:
                    bad = [u.name for u in unseen if _said(cap, u.name) or _said(cap, u.plural)]
                    assert not bad, (cap, bad)
                n += 1
    assert n == 300
    # and no seen name or grammar phrase could say one: the guarantee for every scene, not only these
    said = [c.name for c in cs if c.seen] + [f"{k} {c.plural}" for c in cs if c.seen for k in P.COUNT_WORDS.values()]
    said += P.grammar_phrases()
    for u in unseen:
        assert not any(_said(s, u.name) or _said(s, u.plural) for s in said), u
    # the unseen set draws only unseen concepts
    d = json.loads((out / "eval" / "unseen" / "scenes" / "test.json").read_text())
    assert d["world"] == "pictograms" and all(not cs[o["concept"] - 1].seen for s in d["scenes"] for o in s["objects"])


def test_masks_align_with_the_drawn_objects(prepared):
    """Inside an object's mask its pixels are its pictogram's, exactly where it is opaque and no later object's edge
    touches it; its semantic label is its concept; the written masks load back with the scenes' names."""
    cs = P.load_concepts()
    for i in range(20):
        sc = P.make_pictogram_scene(P.pictogram_rng(0, "val", i, "seen"))
        boxes = []  # (y0, x0, rgba) of each object, in drawing order
        for o in sc.objects:
            boxes.append((int(o.cy - o.side / 2), int(o.cx - o.side / 2), P.render(cs[o.concept - 1].hexcode, o.side)))
        for k, o in enumerate(sc.objects, 1):
            y0, x0, rgba = boxes[k - 1]
            opaque = np.zeros(sc.instance.shape, bool)
            opaque[y0:y0 + o.side, x0:x0 + o.side] = rgba[..., 3] == 255
            later = np.zeros(sc.instance.shape, bool)  # where a later pictogram paints anything at all
            for y1, x1, r1 in boxes[k:]: later[y1:y1 + r1.shape[0], x1:x1 + r1.shape[1]] |= r1[..., 3] > 0
            own = opaque & ~later & (sc.instance == k)
            assert own.sum() > 0.3 * o.visible and (sc.instance[opaque & ~later] == k).all()
            colours = np.zeros_like(sc.image)
            colours[y0:y0 + o.side, x0:x0 + o.side] = rgba[..., :3]
            assert (sc.image[own] == colours[own]).all()
            assert (sc.semantic[sc.instance == k] == o.concept).all()
    out, _ = prepared
    pa = eval_set_paths(out, "unseen")
    kp = load_karpathy(pa["karpathy_json"], pa["image_root"], "test")
    mk = load_masks(pa["masks"]["test"], pa["categories"], kp.ids)
    d = json.loads((pa["scenes"] / "test.json").read_text())
    for m, s in zip(mk.masks, d["scenes"]):
        assert {mk.names[v] for v in np.unique(m) if v > 0} == {o["name"] for o in s["objects"]}


def test_the_oracle_accepts_every_caption_of_its_own_scene(prepared):
    out, _ = prepared
    for s in ("seen", "unseen"):
        r = world_oracle(out / "eval" / s, "test")
        assert r["own_caption_fit_rate"] == 1.0 and r["world"] == "pictograms" and r["n_captions"] == 40
    scs = [P.make_pictogram_scene(P.pictogram_rng(1, "test", i, "seen")) for i in range(40)]
    metas = [x.meta() for x in scs]
    caps = [c for x in scs for c in x.captions]
    fit = P.pictogram_fits(metas, caps, 112)
    t2i = np.repeat(np.arange(len(scs)), 5)
    assert fit[t2i, np.arange(len(caps))].all()
    for j, cap in enumerate(caps):  # a caption never fits a scene that lacks a concept it names
        named = {c[1] for c in metas[t2i[j]]["claims"][j % 5] if c[0] == "count"}
        for i, m in enumerate(metas):
            if not named <= {o["concept"] for o in m["objects"]}: assert not fit[i, j]


def test_training_concepts_follow_a_zipf_law():
    "Concept frequencies over training draws: rank r about 1 / r (log-log slope near -1 over the top 30)."
    ids, p = P.pool_weights("train")
    draws = np.random.default_rng(0).choice(len(ids), size=200_000, p=p)
    freq = np.sort(np.bincount(draws, minlength=len(ids)))[::-1][:30].astype(float)
    slope = np.polyfit(np.log(np.arange(1, 31)), np.log(freq), 1)[0]
    assert -1.15 < slope < -0.85, slope
    assert set(P.pool_weights("seen")[0]) == set(ids) and not set(P.pool_weights("unseen")[0]) & set(ids)


def test_a_world_is_chosen_by_name_and_a_pool_must_exist(tmp_path):
    assert set(WORLDS) == {"shapes", "pictograms"}
    with pytest.raises(KeyError, match="unknown world 'lego'"): get_world("lego")
    y = yaml.safe_load(pictogram_params(tmp_path).read_text())
    y["prepare"]["world"] = "shapes"  # the shapes world has one pool: an unseen set cannot be drawn from it
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(y))
    with pytest.raises(DataConfigError, match=r"evaluate.sets.unseen.concepts: got 'unseen', but world 'shapes' draws"):
        prepare(load_params(tmp_path / "params.yaml"), tmp_path / "out", progress=False, part="eval", eval_set="unseen")


def test_the_prepared_report_says_the_world_and_its_words(prepared):
    out, reports = prepared
    tr = reports["train"]
    assert tr["world"] == "pictograms" and "OpenMoji" in tr["notice"] and "CC BY-SA 4.0" in tr["notice"]
    assert tr["caption_words"]["captions"] == 1500 and tr["caption_words"]["distinct_words"] > 300
    assert 100 <= tr["classes_drawn"] <= sum(c.seen for c in P.load_concepts())  # a long tail of seen concepts
    assert reports["eval/unseen"]["concepts"] == "unseen" and reports["eval/seen"]["concepts"] == "seen"
    table = json.loads((out / "train" / "concepts.json").read_text())
    assert table["n_seen"] + table["n_unseen"] == table["n_concepts"] == len(P.load_concepts())
