"""Issue 21: `python -m lexvla.encode` (sharded, resumable, 2 processes = 1, bad inputs skipped), `index build` from
shards = from the in-memory vectors, Milvus from shards, refused blank queries, cut long queries, and one-line
messages for every damaged file a command loads."""
import json
import os
import sys

import numpy as np
import pytest
import torch
from conftest import BIN, ROOT, run
from PIL import Image

import lexvla.search as ls
from lexvla.encode import main as encode_main
from lexvla.index import InvertedIndex
from lexvla.model import create_model, save_trained
from lexvla.sparse import SparseVectors, VectorShards, shard_file, threshold_for
from lexvla.vectors import encode_images, encode_texts, image_collection

N_IMAGES = 11


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    "A `save_trained` folder of the tiny model (random towers: what is tested is the plumbing, not the recall)."
    model = create_model("tiny").eval()
    with torch.no_grad(): model.visual_codebook.add_(0.01 * torch.randn_like(model.visual_codebook))
    return save_trained(model, tmp_path_factory.mktemp("ckpt") / "model"), model


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    "A folder of small images (two in a subfolder) and one file that is not an image."
    d = tmp_path_factory.mktemp("imgs")
    (d / "sub").mkdir()
    rng = np.random.default_rng(0)
    for i in range(N_IMAGES):
        im = Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8))
        im.save(d / ("sub" if i < 2 else "") / f"{i}.png")
    (d / "broken.png").write_bytes(b"\x89PNG not really")
    return d


def files(folder):
    return {f.name: f.read_bytes() for f in sorted(folder.iterdir())}


def encode(ckpt, src, out, *extra, flag="--images"):
    return encode_main(["--checkpoint", str(ckpt), flag, str(src), "--out", str(out), "--shard-size", "4",
                        "--batch-size", "3", "--device", "cpu", "--no-progress", *extra])


def test_encode_shards_resume_and_index(ckpt, images, tmp_path, capsys):
    folder, model = ckpt
    assert encode(folder, images, tmp_path / "v") == 0
    out = capsys.readouterr()
    r = json.loads(out.out)
    assert (r["items"], r["shards"], r["skipped"]) == (N_IMAGES + 1, 3, 1) and "skipped broken.png" in out.err
    vs = VectorShards(tmp_path / "v")
    m = vs.manifest
    assert m["vocab_fingerprint"] == model.vocab.fingerprint()
    assert m["sparsify"]["threshold"] == threshold_for(model.dim)
    assert vs.ids() == image_collection(images).ids and vs.words() == list(model.vocab.words)
    # the shards hold what the dense encoder gives, sparsified at 1/sqrt(V)
    coll = image_collection(images)
    good = [(i, p) for i, p in zip(coll.ids, coll.items) if i != "broken.png"]
    from lexvla.transforms import image_transform
    dense = encode_images(model, [p for _, p in good], image_transform(model.data_config, train=False))
    ref = SparseVectors.from_dense(dense, threshold=threshold_for(model.dim), ids=[i for i, _ in good])
    got = vs.load()
    assert got.ids == ref.ids
    np.testing.assert_allclose(got.to_dense(), ref.to_dense(), atol=1e-6)
    # killed after shard 0: the rerun writes shards 1 and 2 only, to the same bytes
    whole = files(tmp_path / "v")
    for i in (1, 2): shard_file(tmp_path / "v", i).unlink()
    assert encode(folder, images, tmp_path / "v") == 0 and json.loads(capsys.readouterr().out)["written"] == 2
    assert files(tmp_path / "v") == whole
    # index build from the shards (one at a time) = build from the in-memory vectors: same arrays, ids, scores
    assert ls.main(["index", "build", "--shards", str(tmp_path / "v"), "--out", str(tmp_path / "ix")]) == 0
    assert json.loads(capsys.readouterr().out)["items"] == N_IMAGES
    a, b = InvertedIndex.load(tmp_path / "ix"), InvertedIndex.build(got, vs.words())
    for f in ("shard_ptr", "offsets", "weights", "dense_of", "dense"):
        np.testing.assert_array_equal(getattr(a, f), getattr(b, f))
    q = SparseVectors.from_dense(encode_texts(model, ["a red ring"]), threshold=threshold_for(model.dim))
    assert [(h.id, h.score) for h in a.search(q, k=5)[0]] == [(h.id, h.score) for h in b.search(q, k=5)[0]]
    # another setting into the same folder is refused, not mixed in
    assert encode(folder, images, tmp_path / "v", "--topk", "3") == 2
    assert "differs in sparsify" in capsys.readouterr().err
    # index build --images = encode + build (resumable shards beside the index)
    assert ls.main(["index", "build", "--images", str(images), "--checkpoint", str(folder), "--out",
                    str(tmp_path / "ix2"), "--shard-size", "4", "--batch-size", "3", "--device", "cpu"]) == 0
    assert json.loads(capsys.readouterr().out)["skipped"] == 1
    assert files(tmp_path / "ix2.shards") == whole
    ix2 = files(tmp_path / "ix2")
    assert ix2 == files(tmp_path / "ix") | {"index.json": ix2["index.json"]}  # index.json names its shards folder


def test_two_processes_write_the_same_shards(ckpt, images, tmp_path):
    "2 gloo CPU processes under accelerate, each its own shards: byte for byte the shards of one process."
    folder, _ = ckpt
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(ROOT)}
    for k in ("LOCAL_RANK", "ACCELERATE_LAUNCHED", "WORLD_SIZE", "RANK"): env.pop(k, None)
    args = ["--checkpoint", str(folder), "--images", str(images), "--shard-size", "4", "--batch-size", "3",
            "--device", "cpu", "--threads", "1", "--no-progress"]
    run([sys.executable, "-m", "lexvla.encode", *args, "--out", str(tmp_path / "one")], env=env, timeout=300)
    r = run([sys.executable, "-m", "lexvla.encode", *args, "--out", str(tmp_path / "two"), "--processes", "2"],
            env=env, timeout=300)
    assert json.loads(r.stdout.strip().splitlines()[-1])["processes"] == 2
    assert files(tmp_path / "two") == files(tmp_path / "one")


def test_encode_texts_and_blank_lines(ckpt, tmp_path, capsys):
    folder, model = ckpt
    (tmp_path / "caps.txt").write_text("a red ring\n\ntwo blue squares\n   \n")
    assert encode(folder, tmp_path / "caps.txt", tmp_path / "t", flag="--texts") == 0
    assert json.loads(capsys.readouterr().out)["skipped"] == 2
    vs = VectorShards(tmp_path / "t")
    assert vs.load().ids == [1, 3] and vs.skipped() == {"2": "blank_text", "4": "blank_text"}
    ref = encode_texts(model, ["a red ring", "two blue squares"])
    want = SparseVectors.from_dense(ref, threshold_for(model.dim)).to_dense()
    np.testing.assert_allclose(vs.load().to_dense(), want, atol=1e-6)
    (tmp_path / "caps.csv").write_text("id,caption\nx,a red ring\n")
    assert encode(folder, tmp_path / "caps.csv", tmp_path / "c", "--column", "text", flag="--texts") == 2
    assert "no column 'text'" in capsys.readouterr().err


def test_blank_and_long_queries(ckpt, images, tmp_path, capsys):
    folder, model = ckpt
    words = list(model.vocab.words)
    SparseVectors.from_dense(np.eye(3, len(words), dtype=np.float32), ids=["a", "b", "c"]).save(tmp_path / "v.npz")
    (tmp_path / "w.json").write_text(json.dumps(words))
    assert ls.main(["index", "build", "--vectors", str(tmp_path / "v.npz"), "--words", str(tmp_path / "w.json"),
                    "--out", str(tmp_path / "ix")]) == 0
    capsys.readouterr()
    q = ["index", "query", "--index", str(tmp_path / "ix"), "--checkpoint", str(folder)]
    for blank in ("", "   ", "\t\n"):
        assert ls.main(q + ["--text", "red", "--text", blank]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("lexvla.search error: --text 2 of 2 is ") and "\n" not in err
    assert ls.main(q + ["--text", " ".join(["red"] * 200)]) == 0
    assert "note: --text 1 has 200 tokens: cut to its first 77" in capsys.readouterr().err
    with pytest.raises(ValueError, match="text 1 of 1 is empty"): encode_texts(model, [""])


def test_milvus_from_shards_and_text_queries(ckpt, images, tmp_path):
    from lexvla.milvus import MilvusIndex, connect
    try: connect(tmp_path / "probe.db").close()
    except ConnectionError as e: pytest.skip(f"milvus-lite cannot start here: {e}")
    folder, model = ckpt
    assert encode(folder, images, tmp_path / "v") == 0
    vs = VectorShards(tmp_path / "v")
    with MilvusIndex(vs.words(), uri=str(tmp_path / "m.db"), collection="shards") as idx:
        assert idx.ingest_shards(vs, progress=False) == {"written": N_IMAGES, "skipped": 0}
        assert idx.ingest_shards(vs, progress=False) == {"written": 0, "skipped": N_IMAGES}  # resumed: nothing again
        hits = idx.search_texts(model, ["a red ring"], k=3)
        ref = InvertedIndex.build(vs.load(), vs.words()).search(
            SparseVectors.from_dense(encode_texts(model, ["a red ring"]), threshold_for(model.dim)), k=3)
        assert [h.id for h in hits[0]] == [h.id for h in ref[0]]
        with pytest.raises(ValueError, match="query 1 of 1 is only whitespace"): idx.search_texts(model, ["  "])


# ---- damaged files: every file a command loads, each kind of damage, one line naming the file --------------------

def _damage(path, how):
    data = path.read_bytes()
    if how == "truncated": path.write_bytes(data[:max(1, len(data) // 2)])
    elif how == "empty": path.write_bytes(b"")
    elif how == "random": path.write_bytes(np.random.default_rng(1).integers(0, 256, 300, dtype=np.uint8).tobytes())
    elif how == "invalid_json": path.write_text('{"format": "x", ')
    elif how == "missing_key":
        obj = json.loads(data)
        obj.pop(next(iter(obj)))
        path.write_text(json.dumps(obj))
    elif how == "wrong_type": path.write_text("[1, 2]" if data.lstrip()[:1] == b"{" else '{"a": 1}')


BINARY = ("truncated", "empty", "random")
JSON = ("truncated", "empty", "random", "invalid_json", "missing_key", "wrong_type")
LIST_JSON = ("truncated", "empty", "random", "invalid_json", "wrong_type")
CASES = ([("model", "model.json", h) for h in JSON] + [("model", "weights.safetensors", h) for h in BINARY]
         + [("index", "index.json", h) for h in JSON] + [("index", f, h) for f in ("words.json", "ids.json")
                                                         for h in LIST_JSON]
         + [("index", "postings.npz", h) for h in BINARY]
         + [("shards", "manifest.json", h) for h in JSON] + [("shards", "words.json", h) for h in LIST_JSON]
         + [("shards", "shard-00000.npz", h) for h in BINARY] + [("vectors", "q.npz", h) for h in BINARY])


@pytest.fixture(scope="module")
def pristine(ckpt, images, tmp_path_factory):
    "A model folder, an index, vector shards and query vectors to copy and damage."
    folder, model = ckpt
    d = tmp_path_factory.mktemp("pristine")
    assert encode(folder, images, d / "shards") == 0
    assert ls.main(["index", "build", "--shards", str(d / "shards"), "--out", str(d / "index")]) == 0
    q = SparseVectors.from_dense(encode_texts(model, ["a red ring"]), threshold=threshold_for(model.dim), ids=["q"])
    (d / "vectors").mkdir()
    q.save(d / "vectors" / "q.npz")
    return {"model": folder, "index": d / "index", "shards": d / "shards", "vectors": d / "vectors"}


@pytest.mark.parametrize("kind,name,how", CASES, ids=[f"{k}/{n}/{h}" for k, n, h in CASES])
def test_damaged_file_is_one_line(pristine, tmp_path, capsys, kind, name, how):
    import shutil
    copies = {k: shutil.copytree(p, tmp_path / k) for k, p in pristine.items()}
    _damage(copies[kind] / name, how)
    if how == "wrong_type" and name == "ids.json": pytest.skip("ids.json may hold null (an index without ids)")
    if kind == "model":
        argv = ["index", "query", "--index", str(copies["index"]), "--checkpoint", str(copies["model"]),
                "--text", "red"]
    elif kind == "index":
        argv = ["index", "query", "--index", str(copies["index"]), "--query-vectors", str(copies["vectors"] / "q.npz")]
    elif kind == "shards": argv = ["index", "build", "--shards", str(copies["shards"]), "--out", str(tmp_path / "ix")]
    else: argv = ["index", "query", "--index", str(copies["index"]), "--query-vectors", str(copies["vectors"] / name)]
    capsys.readouterr()
    assert ls.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    assert err.startswith(f"lexvla.search error: {copies[kind] / name}: "), err
    assert any(w in err for w in ("rebuild", "re-run", "retrain", "re-create")), err


@pytest.mark.parametrize("how", BINARY + ("invalid_json", "missing_key"))
def test_damaged_caches_are_one_line(ckpt, tmp_path, how):
    from lexvla.caches import ImageTokenCache, TextPrefixCache
    from lexvla.runtime import DamagedFile
    _, model = ckpt
    tc = TextPrefixCache(torch.zeros(3, 4), torch.tensor([0, 1, 3]), ["a", "b c"], {})
    tc.save(tmp_path / "t")
    ic = ImageTokenCache(torch.zeros(2, 3, 4), ["x.png", "y.png"], {})
    ic.save(tmp_path / "i", "test")
    target = {"binary": [tmp_path / "t" / "prefix.safetensors", tmp_path / "i" / "test.safetensors"],
              "json": [tmp_path / "t" / "captions.json", tmp_path / "i" / "test.json"]}
    for f in target["binary" if how in BINARY else "json"]: _damage(f, how)
    for load, f in ((lambda: TextPrefixCache.load(tmp_path / "t"), "t"),
                    (lambda: ImageTokenCache.load(tmp_path / "i", "test"), "i")):
        with pytest.raises(DamagedFile) as e: load()
        msg = str(e.value)
        assert msg.startswith(str(tmp_path / f)) and "\n" not in msg and "rebuild it (`dvc repro" in msg, msg
