"""The data module: scene generator, on-disk formats and their round trips, loader order, the prepare stage."""
import hashlib
import io
import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from conftest import ROOT, run
from lexvla import scenes as S
from lexvla.decode import DataConfigError
from lexvla.karpathy import karpathy_entry, load_karpathy
from lexvla.manifests import read_manifest
from lexvla.masks import load_masks, png_bytes, write_categories
from lexvla.pairs import collate_pairs, streaming_dataset, train_dataset
from lexvla.prepared import prepared_paths
from lexvla.shards import encode_jpeg, index_shards, sample_key, write_shards
from lexvla.transforms import backbone_data_config, image_transform
from lexvla.params import ParamsError, apply_profile, load_params
from lexvla.prepare import prepare
from lexvla.runtime import write_json

SYN_SHAPE = {w: s for s in S.SHAPES for w in (s, S.PLURALS[s], *S.SHAPE_SYNONYMS.get(s, ()))}
SYN_COLOUR = {w: c for c, (_, syn) in S.COLOURS.items() for w in syn}


def words_of(text):
    return re.findall(r"[a-z]+", text)


def scenes(n=150, seed=3, split="val"):
    return [S.make_scene(S.scene_rng(seed, split, i), 64) for i in range(n)]


def tiny_params(d: Path, **over):
    "The shapes world's params (profiles/shapes.yaml: one evaluated set, `embedded`), small; then `over`."
    y = apply_profile(ROOT / "profiles" / "shapes.yaml", ROOT / "params.yaml")
    y["prepare"].update(n_train=24, n_val=4, n_test=5, shard_size=10, workers=0)
    y["model"] = {"preset": "embedded", "vision": {"img_size": 64}}  # small scenes (the data tests build no model)
    y["prepare"].update(over)
    (d / "params.yaml").write_text(yaml.safe_dump(y))
    return d / "params.yaml"


def digest(d: Path) -> dict:
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.rglob("*")) if p.is_file()}


# ---- the generator -------------------------------------------------------------------------------------------

def test_scene_reproducible_and_seeded():
    a, b = S.make_scene(S.scene_rng(5, "train", 7)), S.make_scene(S.scene_rng(5, "train", 7))
    assert a.image.tobytes() == b.image.tobytes() and a.captions == b.captions
    assert (a.semantic == b.semantic).all() and (a.instance == b.instance).all()
    assert S.make_scene(S.scene_rng(6, "train", 7)).image.tobytes() != a.image.tobytes()
    assert S.make_scene(S.scene_rng(5, "test", 7)).image.tobytes() != a.image.tobytes()


def test_scene_variety():
    sc = scenes(200)
    assert {len(s.objects) for s in sc} == {1, 2, 3, 4}
    assert {o.shape for s in sc for o in s.objects} == set(S.SHAPES)
    assert {o.colour for s in sc for o in s.objects} == set(S.COLOURS)
    assert {s.background for s in sc} == set(S.BACKGROUNDS)
    assert len({c for s in sc for c in s.captions}) > 0.95 * 5 * len(sc)  # captions are not templates ids
    assert any(o1.visible < (S.shape_coverage(o1.shape, o1.cx, o1.cy, o1.r, o1.angle, 64) >= 128).sum()
               for s in sc for o1 in s.objects)  # occlusion happens


def test_captions_distinct_and_true():
    for s in scenes(150):
        assert len(s.captions) == 5 and len(set(s.captions)) == 5
        shapes = {o.shape for o in s.objects}
        colours = {o.colour for o in s.objects}
        for c in s.captions:
            words = words_of(c)
            said = {SYN_SHAPE[w] for w in words if w in SYN_SHAPE}
            assert said and said <= shapes, (c, shapes)  # mentions an object, and no absent shape
            said_c = {SYN_COLOUR[w] for w in words if w in SYN_COLOUR}
            assert said_c <= colours, (c, colours)
            for n, w in S.COUNTS.items():  # "two circles" -> at least two circles
                for m in re.finditer(rf"\b{w} (\w+)", c):
                    tail = words_of(c[m.end(1):])
                    noun = m.group(1) if m.group(1) in SYN_SHAPE else next((t for t in tail if t in SYN_SHAPE), None)
                    if m.group(1) == "shapes": assert len(s.objects) == n, c
                    elif noun: assert sum(o.shape == SYN_SHAPE[noun] for o in s.objects) >= n, c
            for rel, phrases in S.RELATIONS.items():  # "A left of B" holds for some A, B of those shapes
                for ph in sorted(phrases, key=len, reverse=True):
                    if f" {ph} " in c:
                        left, right = c.split(f" {ph} ", 1)
                        sa = [SYN_SHAPE[w] for w in words_of(left) if w in SYN_SHAPE][-1]
                        sb = [SYN_SHAPE[w] for w in words_of(right) if w in SYN_SHAPE][0]
                        assert any(a.shape == sa and b.shape == sb and S.relation_of(a, b, 64) == rel
                                   for a in s.objects for b in s.objects if a is not b), c
                        break


def test_masks_match_drawing():
    for s in scenes(60):
        for k, o in enumerate(s.objects, 1):
            m = s.instance == k
            assert m.sum() == o.visible > 0
            assert np.abs(s.image[m].reshape(-1, 3).mean(0) - np.array(o.rgb)).max() < 40
            assert (s.semantic[m] == S.CATEGORIES.index(o.shape)).all()
            full = S.shape_coverage(o.shape, o.cx, o.cy, o.r, o.angle, 64) >= 128
            assert m.sum() >= 0.6 * full.sum() and not (m & ~full).any()
        assert ((s.semantic == 0) == (s.instance == 0)).all()


def test_circle_mask_matches_analytic_disc():
    rng = np.random.default_rng(0)
    for _ in range(20):
        cx, cy, r = rng.uniform(12, 52, 2).tolist() + [rng.uniform(4, 11)]
        m = S.shape_coverage("circle", cx, cy, r, 0.0, 64) >= 128
        yy, xx = np.mgrid[0:64, 0:64] + 0.5
        dist = np.hypot(xx - cx, yy - cy)
        ref = dist <= r
        assert not (m != ref)[np.abs(dist - r) > 0.75].any()  # they differ only on the boundary


@pytest.mark.repro
def test_vocabulary_is_whole_tokens(tiny_repro):
    "Every word of the scenes' grammar is one SmolLM2 token (with its leading space), in the converted tokenizer."
    tok = tiny_repro["a"] / "models" / "lm" / "tokenizer.json"  # written by the convert stage
    vocab = json.loads(tok.read_text())["model"]["vocab"]
    assert [w for w in S.vocabulary() if "Ġ" + w not in vocab] == []
    words = {w for s in scenes(100) for c in s.captions for w in words_of(c)}
    assert words <= set(S.vocabulary())


# ---- formats and round trips -------------------------------------------------------------------------------

def _counts(reports: dict) -> dict:
    "The split counts of `prepare`'s reports, one per part (train, eval)."
    return {k: v for r in reports.values() for k, v in r["counts"].items()}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    d = tmp_path_factory.mktemp("prep")
    report = prepare(load_params(tiny_params(d)), d / "out", progress=False)
    return d / "out", report


def test_prepare_same_bytes_twice_and_any_workers(prepared, tmp_path):
    out, report = prepared
    p = tiny_params(out.parent)  # the same params file path: params.resolved.json records it
    r = run([sys.executable, "-m", "lexvla.prepare", "--params", str(p), "--out", str(tmp_path / "cli"), "--no-progress"])
    assert "prepared" in r.stdout
    assert digest(out) == digest(tmp_path / "cli")
    y = yaml.safe_load(p.read_text()); y["prepare"]["workers"] = 2; y["prepare"]["n_train"] = 80
    (tmp_path / "w2.yaml").write_text(yaml.safe_dump(y)); y["prepare"]["workers"] = 0
    (tmp_path / "w0.yaml").write_text(yaml.safe_dump(y))
    prepare(load_params(tmp_path / "w2.yaml"), tmp_path / "w2", progress=False)
    prepare(load_params(tmp_path / "w0.yaml"), tmp_path / "w0", progress=False)
    d2, d0 = digest(tmp_path / "w2"), digest(tmp_path / "w0")
    for part in ("train", "eval/embedded"):
        d2.pop(f"{part}/params.resolved.json"); d0.pop(f"{part}/params.resolved.json")
    assert d2 == d0
    assert _counts(report) == {"train": 24, "val": 4, "test": 5}
    assert all(r["skipped_total"] == 0 for r in report.values()) and sorted(report) == ["eval/embedded", "train"]
    for part in ("train", "eval/embedded"):
        assert json.loads((out / part / "params.resolved.json").read_text())["params"]["prepare"]["n_train"] == 24


def test_shards_are_img2dataset_webdataset(prepared):
    import tarfile
    import webdataset as wds
    out, _ = prepared
    shards = sorted((out / "train").glob("*.tar"))
    assert [p.name for p in shards] == ["00000.tar", "00001.tar", "00002.tar"]
    with tarfile.open(shards[1]) as tf:
        names = tf.getnames()
    assert names[:3] == ["000010000.jpg", "000010000.json", "000010000.txt"] and len(names) == 30
    ref = list(wds.WebDataset([str(p) for p in shards], shardshuffle=False, empty_check=False))
    ds = train_dataset(shards, None, seed=0)
    assert [s["__key__"] for s in ref] == ds.keys
    for s in ref[:5]:
        meta = json.loads(s["json"])
        assert s["txt"].decode() == meta["caption"] == meta["captions"][0] and len(meta["captions"]) == 5
        assert Image.open(io.BytesIO(s["jpg"])).size == (64, 64)
    # the streaming reader sees the same samples
    assert sorted(x["key"] for x in streaming_dataset(shards, None, seed=1, shuffle=10)) == sorted(ds.keys)


def test_karpathy_round_trip(prepared):
    out, _ = prepared
    pa = prepared_paths(out)
    d = json.loads(pa["karpathy_json"].read_text())
    assert d["dataset"] == "embedded" and [e["split"] for e in d["images"]] == ["val"] * 4 + ["test"] * 5
    for split, n in (("val", 4), ("test", 5)):
        kp = load_karpathy(pa["karpathy_json"], pa["image_root"], split)
        es = [e for e in d["images"] if e["split"] == split]
        assert len(kp) == n and kp.captions == [s["raw"] for e in es for s in e["sentences"]]
        # plain reference: caption j belongs to image j // 5
        assert kp.txt2img.tolist() == [j // 5 for j in range(5 * n)]
        assert all(kp.txt2img[t] == i for i, ts in enumerate(kp.img2txt) for t in ts)
        sc = [S.make_scene(S.scene_rng(0, split, i), 64) for i in range(n)]
        assert [c for s in sc for c in s.captions] == kp.captions
        for e in es:
            for s in e["sentences"]:
                assert s["imgid"] == e["imgid"] and s["tokens"] == re.findall(r"[a-z0-9]+", s["raw"].lower())
        im = np.asarray(Image.open(kp.images[0]))
        assert np.abs(im.astype(int) - sc[0].image.astype(int)).mean() < 4  # JPEG q95 4:4:4 of the drawn scene
    sentids = [s["sentid"] for e in d["images"] for s in e["sentences"]]
    assert sentids == list(range(len(sentids)))


def test_masks_round_trip(prepared):
    out, _ = prepared
    pa = prepared_paths(out)
    kp = load_karpathy(pa["karpathy_json"], pa["image_root"], "test")
    mk = load_masks(pa["masks"]["test"], pa["categories"], kp.ids)
    assert mk.names == list(S.CATEGORIES) and mk.category_ids == list(range(len(S.CATEGORIES)))
    for i, m in enumerate(mk.masks):
        sc = S.make_scene(S.scene_rng(0, "test", i), 64)
        assert (m == sc.semantic).all()
    pan = json.loads((out / "eval" / "embedded" / "masks" / "panoptic_test.json").read_text())
    for ann in pan["annotations"]:
        png = out / "eval" / "embedded" / "masks" / "panoptic_test" / ann["file_name"]
        rgb = np.asarray(Image.open(png)).astype(np.int64)
        seg = rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2]
        sem = mk.masks[ann["image_id"] - 4]
        for si in ann["segments_info"]:
            assert (sem[seg == si["id"]] == si["category_id"]).all() and (seg == si["id"]).sum() == si["area"]


def test_coco_stuff_masks(tmp_path):
    cats = [{"id": 1, "name": "person", "supercategory": "person"}, {"id": 5, "name": "airplane", "supercategory": "vehicle"},
            {"id": 92, "name": "banner", "supercategory": "textile"}]
    write_json(tmp_path / "stuff.json", {"categories": cats})
    a = np.full((6, 6), 255, np.uint8); a[:2] = 0; a[2:4] = 4; a[4, :3] = 91  # stored as id - 1, 255 unlabeled
    Image.fromarray(a).save(tmp_path / "000000000139.png")
    mk = load_masks(tmp_path, tmp_path / "stuff.json", [139], id_offset=1)
    ref = np.select([a == 0, a == 4, a == 91], [0, 1, 2], -1)
    assert mk.names == ["person", "airplane", "banner"] and (mk.masks[0] == ref).all() and mk.ids == ["000000000139"]
    a[0, 0] = 7  # id 8 is no category
    Image.fromarray(a).save(tmp_path / "000000000139.png")
    with pytest.raises(DataConfigError, match="pixel value 7"): load_masks(tmp_path, tmp_path / "stuff.json", [139], id_offset=1)
    with pytest.raises(DataConfigError, match="no mask for image"): load_masks(tmp_path, tmp_path / "stuff.json", [1])


def _real_fixture(d: Path, n=12):
    rng = np.random.default_rng(0)
    (d / "imgs").mkdir()
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (40 + i, 30, 3), dtype=np.uint8)).save(d / "imgs" / f"im{i}.png")
    return [f"a caption number {i}" for i in range(n)]


def test_manifest_round_trip_csv_and_jsonl(tmp_path):
    caps = _real_fixture(tmp_path)
    (tmp_path / "m.csv").write_text("image,caption\n" + "".join(f"imgs/im{i}.png,\"{c}\"\n" for i, c in enumerate(caps)))
    (tmp_path / "m.jsonl").write_text("".join(json.dumps({"path": f"imgs/im{i}.png", "text": c}) + "\n" for i, c in enumerate(caps)))
    a = read_manifest(tmp_path / "m.csv")
    b = read_manifest(tmp_path / "m.jsonl", "path", "text")
    assert [(x.path, x.captions) for x in a] == [(x.path, x.captions) for x in b] == \
        [(tmp_path / "imgs" / f"im{i}.png", [c]) for i, c in enumerate(caps)]
    p = tiny_params(tmp_path, kind="manifest", source=str(tmp_path / "m.jsonl"), image_column="path",
                    caption_column="text", n_train=0, n_val=2, n_test=3, store_size=32)
    rep = prepare(load_params(p), tmp_path / "out", progress=False)
    assert _counts(rep) == {"train": 7, "val": 2, "test": 3}
    pa = prepared_paths(tmp_path / "out")
    ds = train_dataset(pa["shards"], None, seed=0)
    got = {ds.load(i)["caption"] for i in range(len(ds))}
    kp = load_karpathy(pa["karpathy_json"], pa["image_root"], ("val", "test"))
    assert got | set(kp.captions) == set(caps) and not got & set(kp.captions)
    assert min(Image.open(kp.images[0]).size) == 30 and max(ds.load(0)["pixels"].size) <= 43  # shorter side <= store_size


def test_karpathy_kind_and_webdataset_kind(tmp_path):
    caps = _real_fixture(tmp_path)
    ents = [karpathy_entry(i, f"im{i}.png", ["train", "restval", "val", "test"][i % 4], [caps[i], caps[i] + " again"], 2 * i)
            for i in range(12)]
    write_json(tmp_path / "dataset_flickr30k.json", {"images": ents, "dataset": "flickr30k"})
    p = tiny_params(tmp_path, kind="karpathy", source=str(tmp_path / "dataset_flickr30k.json"),
                    image_root=str(tmp_path / "imgs"), n_train=0, n_val=0, n_test=0)
    rep = prepare(load_params(p), tmp_path / "kp", progress=False)
    assert _counts(rep) == {"train": 6, "val": 3, "test": 3}
    pa = prepared_paths(tmp_path / "kp")
    assert pa["karpathy_json"].name == "dataset_flickr30k.json"
    assert load_karpathy(pa["karpathy_json"], pa["image_root"]).captions == [c for i in (3, 7, 11) for c in (caps[i], caps[i] + " again")]
    # the shards just written are img2dataset-style input for kind webdataset
    p = tiny_params(tmp_path, kind="webdataset", source=str(tmp_path / "kp" / "train" / "{00000..00000}.tar"),
                    eval_json=str(pa["karpathy_json"]), eval_image_root=str(pa["image_root"]), n_train=0, n_val=0, n_test=0)
    rep = prepare(load_params(p), tmp_path / "wd", progress=False)
    assert _counts(rep) == {"train": 6, "val": 3, "test": 3}
    a, b = train_dataset(tmp_path / "kp" / "train", None, 0), train_dataset(tmp_path / "wd" / "train", None, 0)
    assert [a.captions(i) for i in range(6)] == [b.captions(i) for i in range(6)]


# ---- the training loader -----------------------------------------------------------------------------------

def test_loader_order_workers_and_resume(prepared):
    out, _ = prepared
    tf = image_transform(backbone_data_config("vit_small_patch14_dinov2", 64), train=True)
    ds = train_dataset(out / "train", tf, seed=1, captions_per_image=2)

    def batches(workers, epoch, skip=0):
        ds.set_epoch(epoch, skip=skip)
        g = torch.Generator(); g.manual_seed(0)  # as train does: the DataLoader's own seed draw leaves the global RNG
        return list(torch.utils.data.DataLoader(ds, batch_size=5, num_workers=workers, collate_fn=collate_pairs,
                                                drop_last=True, generator=g))

    torch.manual_seed(0); state = torch.get_rng_state()
    b0, b2 = batches(0, 3), batches(2, 3)
    assert torch.equal(torch.get_rng_state(), state)  # the loader leaves the caller's RNG alone
    assert len(b0) == 4 and [b["keys"] for b in b0] == [b["keys"] for b in b2]
    assert [b["captions"] for b in b0] == [b["captions"] for b in b2]
    assert all(torch.equal(x["pixels"], y["pixels"]) for x, y in zip(b0, b2))  # augmentation too
    assert b0[0]["pixels"].shape == (5, 3, 64, 64) and b0[0]["pixels"].dtype == torch.float32
    assert [b["keys"] for b in batches(0, 4)] != [b["keys"] for b in b0]
    for e in range(4, 8):  # workers forked while the parent holds open shards must not race on shared file offsets
        ds.load(0)
        x0, x2 = batches(0, e), batches(2, e)
        assert all(torch.equal(x["pixels"], y["pixels"]) for x, y in zip(x0, x2)) and not ds.log.total
    keys = sorted(k for b in batches(0, 3) for k in b["keys"])
    assert len(set(keys)) == 20 and set(keys) <= set(ds.keys)
    resumed = batches(2, 3, skip=2 * 5)
    assert [b["keys"] for b in resumed] == [b["keys"] for b in b0[2:]]
    assert all(torch.equal(x["pixels"], y["pixels"]) for x, y in zip(resumed, b0[2:]))
    from accelerate import skip_first_batches
    ds.set_epoch(3)
    dl = torch.utils.data.DataLoader(ds, batch_size=5, num_workers=0, collate_fn=collate_pairs, drop_last=True)
    assert [b["keys"] for b in skip_first_batches(dl, 2)] == [b["keys"] for b in b0[2:]]
    # one caption per image per epoch, from its first 2, chosen by (seed, epoch, key)
    firsts = {ds.keys[i]: ds.captions(i)[:2] for i in range(len(ds.keys))}
    seen = {}
    for e in range(6):
        ds.set_epoch(e)
        for i in range(len(ds)):
            s = ds[i]
            assert s["caption"] in firsts[s["key"]]
            seen.setdefault(s["key"], set()).add(s["caption"])
    assert sum(len(v) == 2 for v in seen.values()) > len(seen) / 2
    assert len(ds.all_captions()) == 2 * len(ds.keys)


# ---- misconfiguration and atomic output --------------------------------------------------------------------

def test_misconfiguration_stops_with_a_name(tmp_path, capsys):
    "The prepare command line exits 2 with one line naming the key or file, and writes nothing."
    from lexvla.prepare import main
    caps = _real_fixture(tmp_path, 3)
    (tmp_path / "m.csv").write_text("file,caption\n" + "".join(f"imgs/im{i}.png,{c}\n" for i, c in enumerate(caps)))
    cases = [({"kind": "laion"}, "prepare.kind"),
             ({"kind": "manifest", "source": str(tmp_path / "m.csv")}, "no column 'image' (prepare.image_column)"),
             ({"kind": "manifest", "source": str(tmp_path / "m.csv"), "image_column": "file",
               "image_root": str(tmp_path / "nowhere")}, "prepare.image_root"),
             ({"kind": "webdataset", "source": str(tmp_path / "shards" / "{00000..00003}.tar")}, "shard not found"),
             ({"kind": "karpathy"}, "prepare.source: got null")]
    for over, msg in cases:
        p = tiny_params(tmp_path, **over)
        rc = main(["--params", str(p), "--out", str(tmp_path / "o"), "--no-progress"])
        err = capsys.readouterr().err
        assert rc == 2 and msg in err, (over, err)
        assert not (tmp_path / "o").exists() and not list(tmp_path.glob(".o.*"))
        assert "Traceback" not in err


def test_killed_prepare_leaves_old_output(tmp_path, monkeypatch):
    import lexvla.prepare as P
    p = load_params(tiny_params(tmp_path))
    P.prepare(p, tmp_path / "out", progress=False)
    before = digest(tmp_path / "out")
    def boom(*a, **k): raise KeyboardInterrupt
    monkeypatch.setattr(P, "write_json", boom)  # prepare's own name (it imports it at the top): after the shards
    with pytest.raises(KeyboardInterrupt): P.prepare(p, tmp_path / "out", progress=False)
    assert digest(tmp_path / "out") == before and [x.name for x in tmp_path.iterdir() if x.name.startswith(".")] == []


def test_eval_part_alone_reads_no_training_shard(tmp_path, monkeypatch):
    "`prepare --part eval` with an eval JSON builds the eval set without indexing the (CC-12M-sized) training shards."
    import lexvla.prepare as P
    caps = _real_fixture(tmp_path)
    ents = [karpathy_entry(i, f"im{i}.png", ["train", "val", "test"][i % 3], [caps[i]], i) for i in range(9)]
    write_json(tmp_path / "dataset_flickr30k.json", {"images": ents, "dataset": "flickr30k"})
    p = tiny_params(tmp_path, kind="karpathy", source=str(tmp_path / "dataset_flickr30k.json"),
                    image_root=str(tmp_path / "imgs"), n_train=0, n_val=0, n_test=0)
    P.prepare(load_params(p), tmp_path / "kp", progress=False, part="train")
    p = tiny_params(tmp_path, kind="webdataset", source=str(tmp_path / "kp" / "train" / "*.tar"),
                    eval_json=str(tmp_path / "dataset_flickr30k.json"), eval_image_root=str(tmp_path / "imgs"),
                    n_train=0, n_val=0, n_test=0)
    def no_index(*a, **k): raise AssertionError("the eval part indexed the training shards")
    monkeypatch.setattr(P, "index_shards", no_index)
    rep = P.prepare(load_params(p), tmp_path / "wd", progress=False, part="eval")
    assert _counts(rep) == {"val": 3, "test": 3} and not (tmp_path / "wd" / "train").exists()
    with pytest.raises(AssertionError, match="indexed the training shards"):
        P.prepare(load_params(p), tmp_path / "wd", progress=False, part="train")
