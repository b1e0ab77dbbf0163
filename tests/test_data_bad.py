"""Bad input: every kind the issue lists is survived, skipped or repaired, and counted by reason; good samples survive."""
import io
import json
import tarfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from conftest import ROOT
from lexvla.decode import SkipLog, decode_image
from lexvla.manifests import read_manifest
from lexvla.pairs import train_dataset
from lexvla.prepared import prepared_paths
from lexvla.shards import encode_jpeg, index_shards, sample_key, write_shards
from lexvla.params import apply_profile, load_params
from lexvla.prepare import prepare


def _noise(h, w, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8))


def _bytes(im, fmt, **kw):
    b = io.BytesIO(); im.save(b, fmt, **kw); return b.getvalue()


def bad_images(d: Path) -> dict:
    "name -> (bytes, expected skip reason or conversion)"
    png = _bytes(_noise(32, 32, 1), "PNG")
    corrupt = bytearray(png); i = corrupt.index(b"IDAT") + 20; corrupt[i:i + 40] = b"\x00" * 40  # breaks IDAT + CRC
    pal = Image.new("P", (20, 20)); pal.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762); pal.info["transparency"] = 0
    exif = Image.Exif(); exif[0x0112] = 6  # rotate 90 degrees on display
    return {
        "good0.jpg": (_bytes(_noise(30, 40, 2), "JPEG"), None),
        "good1.png": (_bytes(_noise(50, 20, 3), "PNG"), None),
        "good2.webp": (_bytes(_noise(24, 24, 4), "WEBP"), None),
        "corrupt.png": (bytes(corrupt), "corrupt"),
        "truncated.jpg": (_bytes(_noise(64, 64, 5), "JPEG", quality=95)[:1500], "truncated"),
        "zero.jpg": (b"", "empty_file"),
        "notimage.jpg": (b"<html><body>404 Not Found</body></html>", "not_an_image"),
        "onebyone.png": (_bytes(Image.new("RGB", (1, 1)), "PNG"), "too_small"),
        "huge.png": (_bytes(Image.new("1", (12000, 12000)), "PNG"), "too_large"),  # 144 Mpx > PIL's 89 Mpx
        "cmyk.jpg": (_bytes(Image.new("CMYK", (20, 20), (0, 255, 255, 0)), "JPEG"), "cmyk"),
        "rgba.png": (_bytes(Image.new("RGBA", (20, 20), (0, 0, 255, 0)), "PNG"), "alpha"),
        "palette.png": (_bytes(pal, "PNG", transparency=0), "palette"),
        "sixteen.png": (_bytes(Image.fromarray(np.full((20, 20), 32768, np.uint16)), "PNG"), "16bit"),
        "gray.jpg": (_bytes(Image.new("L", (20, 20), 128), "JPEG"), "grayscale"),
        "exif.jpg": (_bytes(_noise(20, 30, 6), "JPEG", exif=exif), "exif_rotated"),
    }


SKIPS = {"corrupt", "truncated", "empty_file", "not_an_image", "too_small", "too_large"}


def test_decode_each_bad_image(tmp_path):
    for name, (data, want) in bad_images(tmp_path).items():
        log = SkipLog()
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no DecompressionBombWarning or other leak
            im = decode_image(data, log, name)
        if want in SKIPS:
            assert im is None and dict(log.skipped) == {want: 1} and log.examples[want] == [name], name
        else:
            assert im is not None and im.mode == "RGB" and log.total == 0, name
            assert dict(log.converted) == ({want: 1} if want else {}), (name, log.converted)
    # what the repairs give
    imgs = {k: decode_image(v[0]) for k, v in bad_images(tmp_path).items()}
    assert imgs["exif.jpg"].size == (20, 30)  # was 30 x 20, shown upright
    assert imgs["rgba.png"].getpixel((3, 3)) == (255, 255, 255)  # transparent -> white, not the hidden blue
    assert imgs["palette.png"].getpixel((3, 3)) == (255, 255, 255)
    assert imgs["sixteen.png"].getpixel((3, 3)) == (128, 128, 128)  # 32768 / 257, not clipped to 255
    assert imgs["cmyk.jpg"].getpixel((3, 3))[0] > 200 and imgs["cmyk.jpg"].getpixel((3, 3))[2] < 60  # red
    assert decode_image(tmp_path / "absent.jpg", log := SkipLog()) is None and dict(log.skipped) == {"missing_file": 1}


def _params(d: Path, **over) -> Path:
    "Real-data params: one evaluated set (`embedded`, the split prepare holds out), as profiles/shapes.yaml has."
    y = apply_profile(ROOT / "profiles" / "shapes.yaml", ROOT / "params.yaml")
    y["prepare"].update(n_train=0, n_val=0, n_test=0, shard_size=4, workers=0, store_size=64, **over)
    (d / "params.yaml").write_text(yaml.safe_dump(y))
    return d / "params.yaml"


def test_prepare_manifest_with_every_bad_input(tmp_path):
    imgs = bad_images(tmp_path)
    (tmp_path / "img").mkdir()
    for name, (data, _) in imgs.items(): (tmp_path / "img" / name).write_bytes(data)
    for k in range(4): (tmp_path / "img" / f"capbad{k}.jpg").write_bytes(imgs["good0.jpg"][0])
    rows = [f"img/{n},caption of {n}\n".encode() for n in imgs]
    rows += [b"img/capbad0.jpg,\n", b"img/capbad1.jpg,\"   \"\n", b"img/capbad2.jpg," + b"x" * 5000 + b"\n",
             b"img/capbad3.jpg,caf\xe9 au lait\n",               # latin-1 byte: not UTF-8
             b"img/missing.jpg,a caption of nothing\n",          # row pointing at a missing file
             b"img/good0.jpg,caption of good0.jpg\n",            # the same pair again
             b"img/good0.jpg,another caption of good0\n"]        # a second caption of one image: kept
    (tmp_path / "m.csv").write_bytes(b"image,caption\n" + b"".join(rows))
    rep = prepare(load_params(_params(tmp_path, kind="manifest", source=str(tmp_path / "m.csv"))), tmp_path / "out",
                  progress=False, part="train")["train"]
    want_skip = {r: 1 for _, r in imgs.values() if r in SKIPS}
    want_skip.update(caption_empty=1, caption_whitespace=1, caption_too_long=1, caption_not_utf8=1, missing_file=1,
                     duplicate_caption=1)
    assert rep["skipped"] == want_skip and rep["skipped_total"] == sum(want_skip.values())
    assert rep["converted"] == {r: 1 for _, r in imgs.values() if r and r not in SKIPS}
    assert rep["skipped_examples"]["too_large"] == ["img/huge.png"] and "m.csv:" in rep["skipped_examples"]["caption_empty"][0]
    good = [n for n, (_, r) in imgs.items() if r not in SKIPS]
    assert rep["counts"]["train"] == len(good)
    assert json.loads((tmp_path / "out" / "train" / "report.json").read_text()) == rep
    ds = train_dataset(prepared_paths(tmp_path / "out", "train")["shards"], None, seed=0)
    srcs = {}
    for i in range(len(ds)):
        s = ds.load(i)
        assert s["pixels"].mode == "RGB"
        srcs[s["caption"]] = s["pixels"].size
    assert set(srcs) >= {f"caption of {n}" for n in good if n != "good0.jpg"}
    assert ds.captions(0) == ["caption of good0.jpg", "another caption of good0"]
    assert srcs["caption of exif.jpg"] == (20, 30)


def test_manifest_duplicate_keys_and_bad_rows(tmp_path):
    for n in ("a", "b"): Image.new("RGB", (10, 10)).save(tmp_path / f"{n}.png")
    (tmp_path / "m.jsonl").write_text("\n".join([
        json.dumps({"id": 1, "image": "a.png", "caption": "first"}),
        json.dumps({"id": 1, "image": "b.png", "caption": "same key, other file"}),
        json.dumps({"id": 2, "image": "b.png", "caption": "fine"}),
        "{not json", json.dumps(["a list"]), json.dumps({"id": 3, "caption": "no image"}),
    ]) + "\n")
    log = SkipLog()
    items = read_manifest(tmp_path / "m.jsonl", key_column="id", log=log)
    assert [(i.key, i.path.name, i.captions) for i in items] == [("1", "a.png", ["first"]), ("2", "b.png", ["fine"])]
    assert dict(log.skipped) == {"duplicate_key": 1, "bad_row": 3}


def _bad_shards(d: Path):
    "Two tar shards with a duplicate key, a zero-byte image, a non-UTF-8 caption, a sample without caption and one without image."
    good = lambda i: {"__key__": sample_key(i, 100), "jpg": encode_jpeg(np.full((16, 16, 3), 10 * i, np.uint8)),
                      "txt": f"caption {i}", "json": {"key": sample_key(i, 100)}}
    write_shards([good(i) for i in range(5)], d / "a", 100)
    (d / "b").mkdir()
    with tarfile.open(d / "b" / "00001.tar", "w") as tf:
        def add(name, data):
            ti = tarfile.TarInfo(name); ti.size = len(data); tf.addfile(ti, io.BytesIO(data))
        add("000000002.jpg", encode_jpeg(np.zeros((16, 16, 3), np.uint8))); add("000000002.txt", b"dup")  # duplicate key
        add("000010000.jpg", b""); add("000010000.txt", b"zero-byte image")
        add("000010001.jpg", encode_jpeg(np.zeros((16, 16, 3), np.uint8))); add("000010001.txt", b"\xff\xfe bad")
        add("000010002.jpg", encode_jpeg(np.zeros((16, 16, 3), np.uint8)))                                 # no caption
        add("000010003.txt", b"no image")
        add("000010004.jpg", b"GIF89a broken"); add("000010004.txt", b"not an image")
        add("000010005.jpg", encode_jpeg(np.full((16, 16, 3), 200, np.uint8))); add("000010005.txt", b"good one")
    return [d / "a" / "00000.tar", d / "b" / "00001.tar"]


def test_shards_with_bad_samples(tmp_path):
    shards = _bad_shards(tmp_path)
    log = SkipLog()
    idx = index_shards(shards, log)
    assert dict(log.skipped) == {"duplicate_key": 1, "caption_missing": 1, "missing_image": 1}
    assert len(idx) == 9
    # the loader replaces undecodable samples by the next in the epoch's order and counts them
    ds = train_dataset(shards, None, seed=0)
    with pytest.warns(UserWarning, match="skipping bad samples"):
        got = [ds[i] for i in range(len(ds))]
    assert all(g["caption"] not in ("zero-byte image", " bad", "not an image") for g in got)
    assert {"empty_file", "caption_not_utf8", "not_an_image"} <= set(ds.log.skipped)
    # prepare (kind webdataset) keeps exactly the good ones
    rep = prepare(load_params(_params(tmp_path, kind="webdataset", source=str(tmp_path / "*" / "*.tar"))),
                  tmp_path / "out", progress=False, part="train")["train"]
    assert rep["counts"]["train"] == 6
    assert rep["skipped"] == {"duplicate_key": 1, "caption_missing": 1, "missing_image": 1, "empty_file": 1,
                              "caption_not_utf8": 1, "not_an_image": 1}
    out = train_dataset(tmp_path / "out" / "train", None, seed=0)
    assert sorted(out.captions(i)[0] for i in range(len(out))) == sorted([f"caption {i}" for i in range(5)] + ["good one"])


def test_corrupt_shard_keeps_what_it_can(tmp_path):
    shards = _bad_shards(tmp_path)
    data = shards[0].read_bytes()
    (tmp_path / "cut.tar").write_bytes(data[:len(data) // 2])
    log = SkipLog()
    idx = index_shards([tmp_path / "cut.tar"], log)
    assert dict(log.skipped) == {"corrupt_shard": 1} and "cut.tar" in log.examples["corrupt_shard"][0]
    assert [s.key for s in idx] == [sample_key(i, 100) for i in range(len(idx))] and 0 < len(idx) < 5
    ds = train_dataset([tmp_path / "cut.tar"], None, seed=0)
    assert all(ds.load(i) is not None for i in range(len(ds)))  # the members before the damage are whole
