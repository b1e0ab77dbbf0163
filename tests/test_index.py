"""lexvla.index: exact top-k against brute force (ties included), explanations, files, vocabulary checks; and its
command line, `python -m lexvla.search index build|query` (lexvla.search)."""
import json
import math

import numpy as np
import pytest
import scipy.sparse as sps

import lexvla.search as ls
from lexvla.index import InvertedIndex, VocabularyMismatch, words_fingerprint
from lexvla.search import list_images, main
from lexvla.sparse import SparseVectors


def tied_sparse(n, V, density, seed, levels=4):
    "Random sparse vectors whose weights take few values: many exactly tied scores."
    rng = np.random.default_rng(seed)
    x = rng.integers(1, levels + 1, size=(n, V)) / levels * (rng.random((n, V)) < density)
    return SparseVectors.from_dense(x.astype(np.float32), ids=[f"item{i}" for i in range(n)])


def brute(sv, qi, qw, k):
    "Plain loop: score = float64 sum over shared words in ascending word order; rank by (-score, row)."
    qd = dict(zip(qi.tolist(), np.asarray(qw, np.float32).astype(np.float64).tolist()))
    scored = []
    for r in range(len(sv)):
        di, dw = sv.row(r)
        shared = [(j, w) for j, w in zip(di.tolist(), dw.astype(np.float64).tolist()) if j in qd]
        if not shared: continue
        s = 0.0
        for j, w in shared: s += qd[j] * w
        scored.append((-s, r))
    return [(r, -s) for s, r in sorted(scored)[:k]]


@pytest.mark.parametrize("seed,k,shard", [(0, 1, 8), (1, 5, 1 << 16), (2, 10, 64), (3, 500, 1)])
def test_exact_topk_equals_brute_force(seed, k, shard):
    V = 60
    docs = tied_sparse(300, V, 0.15, seed)
    qs = tied_sparse(12, V, 0.1, seed + 100)
    idx = InvertedIndex.build(docs, [f"w{i}" for i in range(V)], shard=shard)
    d64 = docs.to_scipy().astype(np.float64)
    for i, hits in enumerate(idx.search(qs, k=k, explain=None)):
        ref = brute(docs, *qs.row(i), k)
        assert [(h.row, h.score) for h in hits] == ref           # same rows, same order, bit-identical scores
        assert [h.id for h in hits] == [docs.ids[r] for r, _ in ref]
        q = np.zeros(V); qi, qw = qs.row(i); q[qi] = qw
        full = d64 @ q                                           # scipy's float64 product: the same bits
        np.testing.assert_array_equal(idx.score_all((qi, qw)), full)
        for h in hits: assert math.isclose(math.fsum(c for _, c in h.explanation), h.score, rel_tol=1e-12)


def test_float16_is_exact_for_rounded_vectors():
    V = 40
    docs = tied_sparse(200, V, 0.3, 5, levels=1000)
    idx = InvertedIndex.build(docs, [str(i) for i in range(V)], dtype="float16")
    rounded = SparseVectors(docs.indptr, docs.indices, docs.data.astype(np.float16).astype(np.float32), V, docs.ids)
    qs = tied_sparse(5, V, 0.3, 6, levels=1000)
    for i, hits in enumerate(idx.search(qs, k=7, explain=0)):
        assert [(h.row, h.score) for h in hits] == brute(rounded, *qs.row(i), 7)
        assert all(h.explanation == [] for h in hits)
    assert idx.dtype == "float16" and idx.nbytes < InvertedIndex.build(docs, [str(i) for i in range(V)]).nbytes


def test_query_forms_agree():
    V = 30
    docs = tied_sparse(50, V, 0.3, 7)
    idx = InvertedIndex.build(docs, [f"w{i}" for i in range(V)])
    dense = np.zeros(V, np.float32); dense[[2, 5, 9]] = [0.5, 0.25, 1.0]
    ref = [(h.id, h.score) for h in idx.search(dense, k=5)]
    assert [(h.id, h.score) for h in idx.search({9: 1.0, 2: 0.5, 5: 0.25}, k=5)] == ref
    assert [(h.id, h.score) for h in idx.search(([5, 9, 2, 2], [0.25, 1.0, 0.25, 0.25]), k=5)] == ref  # duplicates summed
    assert [(h.id, h.score) for h in idx.search(dense[None], k=5)[0]] == ref
    with pytest.raises(ValueError, match="k must be"): idx.search(dense, k=0)
    with pytest.raises(ValueError, match="finite"): idx.search(([1], [np.nan]))
    with pytest.raises(ValueError, match="2 word indices but 1 weights"): idx.search(([1, 2], [1.0]))


def test_explanations_name_the_shared_words():
    words = ["red", "green", "ring", "square", "blue", "sky"]
    docs = SparseVectors.from_dense(np.array([[0.5, 0, 0.8, 0, 0.1, 0], [0, 0.9, 0, 0.4, 0, 0]], np.float32), ids=["a", "b"])
    idx = InvertedIndex.build(docs, words)
    hits = idx.search({0: 1.0, 2: 0.5, 4: 2.0, 5: 1.0}, k=5, explain=2)
    assert [h.id for h in hits] == ["a"]  # b shares no word: not a hit
    assert [w for w, _ in hits[0].explanation] == ["red", "ring"]  # 0.5, 0.4 (blue 0.2 cut by explain=2)
    assert hits[0].explanation[1][1] == pytest.approx(0.4) and hits[0].score == pytest.approx(1.1)


def test_save_load_and_vocabulary_checks(tmp_path):
    V = 20
    words = [f"w{i}" for i in range(V)]
    docs = tied_sparse(40, V, 0.3, 8)
    idx = InvertedIndex.build(docs, words, meta={"sparsify": {"threshold": 0.1}})
    p = idx.save(tmp_path / "ix")
    assert sorted(f.name for f in p.iterdir()) == ["ids.json", "index.json", "postings.npz", "words.json"]
    back = InvertedIndex.load(p, words=words)
    assert back.meta["sparsify"] == {"threshold": 0.1} and back.ids == docs.ids
    for f in ("shard_ptr", "offsets", "weights", "dense_of", "dense"):
        np.testing.assert_array_equal(getattr(back, f), getattr(idx, f))
    with np.load(p / "postings.npz", allow_pickle=False) as z: assert all(z[k].dtype != object for k in z.files)
    info = json.loads((p / "index.json").read_text())
    assert info["vocab_fingerprint"] == words_fingerprint(words) and info["n"] == 40
    with pytest.raises(VocabularyMismatch, match="built over vocabulary"): InvertedIndex.load(p, words=words[:-1] + ["x"])
    with pytest.raises(VocabularyMismatch, match="V=20"): InvertedIndex.build(docs, words[:-1])
    (p / "words.json").write_text(json.dumps(words[::-1]))
    with pytest.raises(ValueError, match="corrupt"): InvertedIndex.load(p)
    with pytest.raises(FileNotFoundError, match="not an index folder"): InvertedIndex.load(tmp_path / "nope")


def test_cli_with_precomputed_vectors(tmp_path, capsys):
    V = 25
    words = [f"w{i}" for i in range(V)]
    docs, qs = tied_sparse(60, V, 0.3, 9), tied_sparse(3, V, 0.2, 10)
    docs.save(tmp_path / "items.npz"); qs.save(tmp_path / "q.npz")
    (tmp_path / "words.txt").write_text("\n".join(words))
    assert main(["index", "build", "--vectors", str(tmp_path / "items.npz"), "--words", str(tmp_path / "words.txt"),
                 "--out", str(tmp_path / "ix"), "--dtype", "float32"]) == 0
    assert json.loads(capsys.readouterr().out)["items"] == 60
    assert main(["index", "query", "--index", str(tmp_path / "ix"), "--query-vectors", str(tmp_path / "q.npz"),
                 "-k", "3", "--explain", "2", "--json", str(tmp_path / "out" / "h.json"), "--print"]) == 0
    printed = capsys.readouterr().out
    got = json.loads((tmp_path / "out" / "h.json").read_text())
    ref = InvertedIndex.build(docs, words).search(qs, k=3, explain=2)
    assert [[h["id"] for h in g["hits"]] for g in got] == [[h.id for h in hits] for hits in ref]
    assert got[0]["hits"][0]["explanation"][0]["word"] in printed and "query: item0" in printed
    # re-sparsified at build time: top-2 words per item
    assert main(["index", "build", "--vectors", str(tmp_path / "items.npz"), "--words", str(tmp_path / "words.txt"),
                 "--out", str(tmp_path / "ix2"), "--topk", "2"]) == 0
    assert InvertedIndex.load(tmp_path / "ix2").nnz <= 2 * 60
    assert main(["index", "build", "--vectors", str(tmp_path / "items.npz"), "--out", str(tmp_path / "ix3")]) == 2
    assert "--vectors needs --words" in capsys.readouterr().err


class FakeModel:
    "Stands in for a trained model: image vectors from the image's colour, text vectors from word matches."
    def __init__(self, words):
        import torch
        self.vocab = type("Vocab", (), {"words": words, "fingerprint": lambda self: "fake"})()
        self.dim, self.device = len(words), torch.device("cpu")
        self.data_config = {"input_size": (3, 8, 8), "interpolation": "bicubic", "mean": (0, 0, 0), "std": (1, 1, 1),
                            "crop_pct": 1.0, "crop_mode": "center"}
        self.config = type("Config", (), {"max_text_tokens": 77})()
        self.tokenizer = lambda texts, add_special_tokens: {"input_ids": [t.split() for t in texts]}

    def encode_image(self, pixels):  # red images: red ring; green ones: green square
        import torch
        red = pixels[:, 0].mean((1, 2)) > pixels[:, 1].mean((1, 2))
        return torch.stack([torch.tensor([0.9, 0.0, 0.5, 0.0] if r else [0.0, 0.8, 0.0, 0.6]) for r in red])


def test_cli_model_path(tmp_path, monkeypatch, capsys):
    import torch
    from PIL import Image
    words = ["red", "green", "ring", "square"]
    folder = tmp_path / "imgs"; (folder / "sub").mkdir(parents=True)
    Image.new("RGB", (16, 16), (200, 0, 0)).save(folder / "a.png")
    Image.new("RGB", (16, 16), (0, 200, 0)).save(folder / "sub" / "b.jpg")
    (folder / "c.txt").write_bytes(b"x")
    monkeypatch.setattr(ls, "_load_model", lambda ckpt, device="cpu": FakeModel(words))
    monkeypatch.setattr(ls, "checkpoint_digest", lambda ckpt: "fake")
    monkeypatch.setattr(ls, "_encode_texts", lambda m, texts: torch.tensor(
        [[1.0 if w in t.split() else 0.0 for w in words] for t in texts]))
    assert main(["index", "build", "--images", str(folder), "--checkpoint", "ckpt", "--out", str(tmp_path / "ix")]) == 0
    idx = InvertedIndex.load(tmp_path / "ix")
    assert idx.ids == ["a.png", "sub/b.jpg"] and idx.meta["sparsify"]["threshold"] == 0.5  # 1/sqrt(4)
    capsys.readouterr()
    assert main(["index", "query", "--index", str(tmp_path / "ix"), "--checkpoint", "ckpt", "--text", "a red ring",
                 "--text", "green square", "--json", str(tmp_path / "h.json")]) == 0
    got = json.loads((tmp_path / "h.json").read_text())
    assert got[0]["query"] == "a red ring" and [h["id"] for h in got[0]["hits"]] == ["a.png"]
    assert [e["word"] for e in got[0]["hits"][0]["explanation"]] == ["red"]  # ring 0.5 is not above 0.5
    assert [h["id"] for h in got[1]["hits"]] == ["sub/b.jpg"]
    monkeypatch.setattr(ls, "_load_model", lambda ckpt, device="cpu": FakeModel(["other"] * 4))
    assert main(["index", "query", "--index", str(tmp_path / "ix"), "--checkpoint", "ckpt", "--text", "red"]) == 2
    assert "built over vocabulary" in capsys.readouterr().err


def test_list_images_manifests(tmp_path):
    for n in ("x.jpg", "y.png"): (tmp_path / n).write_bytes(b"x")
    (tmp_path / "m.txt").write_text("x.jpg\n# comment\ny.png\nx.jpg\n")
    (tmp_path / "m.csv").write_text("image,caption\nx.jpg,a\ny.png,b\n")
    (tmp_path / "m.jsonl").write_text('{"image": "y.png"}\n\n{"image": "x.jpg"}\n')
    assert list_images(tmp_path / "m.txt")[1] == ["x.jpg", "y.png"]
    assert list_images(tmp_path / "m.csv")[1] == ["x.jpg", "y.png"]
    paths, ids = list_images(tmp_path / "m.jsonl")
    assert ids == ["y.png", "x.jpg"] and paths[0] == tmp_path / "y.png"
    (tmp_path / "bad.txt").write_text("nope.jpg\n")
    with pytest.raises(FileNotFoundError, match="nope.jpg"): list_images(tmp_path / "bad.txt")
    (tmp_path / "bad.csv").write_text("path\nx.jpg\n")
    with pytest.raises(ValueError, match="no 'image' column"): list_images(tmp_path / "bad.csv")
    with pytest.raises(ValueError, match="must be .txt"): list_images(tmp_path / "x.jpg")


def test_build_matches_scipy_csc_on_larger_data():
    "The sharded postings, sparse and dense, hold exactly scipy's CSC (postings in ascending item order)."
    m = sps.random(3000, 497, density=0.05, format="csr", random_state=11, dtype=np.float32)
    m = sps.hstack([np.full((3000, 3), 0.5, np.float32), m], format="csr")  # three words in every item: dense
    sv = SparseVectors.from_scipy(m)
    idx = InvertedIndex.build(sv, [str(i) for i in range(500)], shard=256)
    assert (idx.dense_of >= 0).sum() >= 3 * 12 and len(idx.offsets) > 0
    csc = sv.to_scipy().tocsc()
    word_ptr, rows, weights = idx.to_csc()
    np.testing.assert_array_equal(word_ptr, csc.indptr)
    np.testing.assert_array_equal(rows, csc.indices)
    np.testing.assert_array_equal(weights, csc.data)
    assert idx.ids is None and idx.search(({3: 1.0}), k=1)[0].id == idx.search(({3: 1.0}), k=1)[0].row


def test_signed_weights_keep_items_that_share_a_word():
    "With negative weights a sharing item can score 0 or less: still a hit, ranked after the positives."
    V = 30
    rng = np.random.default_rng(12)
    x = rng.integers(-2, 3, size=(120, V)) * (rng.random((120, V)) < 0.2) / 2
    docs = SparseVectors.from_dense(x.astype(np.float32), ids=list(range(120)))
    idx = InvertedIndex.build(docs, [str(i) for i in range(V)])
    assert not idx.positive
    for qx in ([(3, 1.0), (7, -0.5), (11, 0.5)], [(1, 1.0), (2, 1.0)]):
        qi, qw = np.array([a for a, _ in qx]), np.array([b for _, b in qx], np.float32)
        hits = idx.search((qi, qw), k=200, explain=None)
        assert [(h.row, h.score) for h in hits] == brute(docs, qi, qw, 200)
        assert any(h.score <= 0 for h in hits)


def adversarial(n=6000, V=400, seed=21):
    "Zipf word use with a word in every item, a word in one item, few weight levels (ties) and duplicated items."
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, V + 1)
    rows = []
    for _ in range(n):
        m = int(rng.integers(1, 60))
        w = np.unique(np.concatenate([[0], rng.choice(V - 1, size=m, p=p[:-1] / p[:-1].sum())]))
        rows.append((w, rng.integers(1, 5, size=len(w)) / 4))  # 4 weight levels: many exactly tied scores
    for i in range(0, n, 7): rows[i + 1 if i + 1 < n else i] = rows[i]  # exact copies: same score, other row
    rows[n // 2] = (np.array([V - 1]), np.array([1.0]))                # the last word: in one item only
    indptr = np.cumsum([0] + [len(w) for w, _ in rows])
    return SparseVectors(indptr, np.concatenate([w for w, _ in rows]), np.concatenate([x for _, x in rows]), V,
                         ids=[f"d{i}" for i in range(n)])


def reference_top(csr64, qi, qw, k):
    "Brute force: scipy's float64 product; hits are the items sharing a word, ranked by (score desc, row asc)."
    q = np.zeros(csr64.shape[1])
    q[qi] = np.asarray(qw, np.float32)
    s = csr64 @ q
    shares = np.flatnonzero(np.diff(csr64[:, np.asarray(qi)].tocsr().indptr) > 0)
    r = shares[np.lexsort((shares, -s[shares]))][:k]
    return list(zip(r.tolist(), s[r].tolist()))


@pytest.mark.parametrize("shard", [64, 1 << 16])
def test_adversarial_exactness_single_and_batched(shard):
    "Ties, Zipf word use, very long and very short posting lists: ids, order and float64 scores equal brute force."
    docs = adversarial()
    V = docs.dim
    csr64 = docs.to_scipy().astype(np.float64)
    idx = InvertedIndex.build(docs, [f"w{i}" for i in range(V)], shard=shard)
    if shard == 64: assert (idx.dense_of >= 0).any() and len(idx.offsets) > 0  # both kinds of list are used
    rng = np.random.default_rng(3)
    queries = [(np.array([0]), np.array([1.0], np.float32)),                # the longest list alone: ties at k
               (np.array([V - 1]), np.array([0.5], np.float32)),            # one item matches: fewer than k hits
               (np.array([V - 3, V - 2]), np.array([1.0, 1.0], np.float32))]
    for _ in range(20):
        qi = np.sort(rng.choice(V, size=int(rng.integers(1, 40)), replace=False))
        queries.append((qi, (rng.integers(1, 4, size=len(qi)) / 2).astype(np.float32)))
    for k in (1, 10, 100):
        batch = idx.search(queries, k=k, explain=None)
        for (qi, qw), hits in zip(queries, batch):
            ref = reference_top(csr64, qi, qw, k)
            assert [(h.row, h.score) for h in hits] == ref                  # bit-identical scores, same order
            assert [h.id for h in hits] == [docs.ids[r] for r, _ in ref]
            assert [(h.row, h.score) for h in idx.search((qi, qw), k=k, explain=None)] == ref
            for h in hits: assert math.isclose(math.fsum(c for _, c in h.explanation), h.score, rel_tol=1e-12)
    assert len(idx.search(queries[0], k=10)) == 10 and len(idx.search(queries[1], k=10)) == 1


def test_adversarial_float16_and_signed_queries():
    docs = adversarial(n=3000, seed=5)
    V = docs.dim
    rng = np.random.default_rng(8)
    noisy = SparseVectors(docs.indptr, docs.indices, (docs.data * rng.uniform(0.5, 1.5, docs.nnz)).astype(np.float32),
                          V, docs.ids)
    idx16 = InvertedIndex.build(noisy, [str(i) for i in range(V)], dtype="float16", shard=128)
    rounded = SparseVectors(noisy.indptr, noisy.indices, noisy.data.astype(np.float16).astype(np.float32), V)
    r64 = rounded.to_scipy().astype(np.float64)
    idx32 = InvertedIndex.build(docs, [str(i) for i in range(V)], shard=128)
    d64 = docs.to_scipy().astype(np.float64)
    for _ in range(10):
        qi = np.sort(rng.choice(V, size=int(rng.integers(2, 30)), replace=False))
        qw = rng.choice([-1.0, 0.5, 1.0], size=len(qi)).astype(np.float32)  # signed: a sharing item may score <= 0
        assert [(h.row, h.score) for h in idx16.search((qi, np.abs(qw)), k=10, explain=0)] == \
            reference_top(r64, qi, np.abs(qw), 10)
        assert [(h.row, h.score) for h in idx32.search((qi, qw), k=50, explain=0)] == reference_top(d64, qi, qw, 50)
        np.testing.assert_array_equal(idx32.score_all((qi, qw)), d64 @ np.bincount(qi, qw.astype(np.float64), V))
