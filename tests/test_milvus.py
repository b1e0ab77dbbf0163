"""lexvla.milvus on the embedded engine (milvus-lite): exact top-k against brute force, a SIGKILLed ingest that
resumes to exactly N items, the vocabulary check, and the portable exports. A Milvus server is never contacted."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import scipy.sparse as sps

from lexvla.milvus import (IMPACT_SCALE, MilvusIndex, VocabularyMismatch, connect, export_jsonl, export_keys,
                           read_jsonl, quantize, random_lexical, vocab_fingerprint)
from lexvla.sparse import SparseVectors

V = 2000
WORDS = [f"word{j}" for j in range(V)]


@pytest.fixture(scope="module")
def lite(tmp_path_factory):
    "A folder for milvus-lite files; skips the module only when the embedded engine cannot start here."
    d = tmp_path_factory.mktemp("milvus")
    try:
        c = connect(d / "probe.db")
    except ConnectionError as e:
        pytest.skip(f"milvus-lite cannot start on this platform: {e}")
    c.close()
    return d


def csr(sv):
    return sps.csr_matrix((sv.data, sv.indices, sv.indptr), shape=(len(sv), sv.dim))


def brute_force(queries, docs, k):
    "Exact top-k by inner product with scipy; only positive scores (items sharing a word), ties by row order."
    S = (csr(queries) @ csr(docs).T).toarray()
    out = []
    for s in S:
        best = [j for j in np.argsort(-s, kind="stable")[:k] if s[j] > 0]
        out.append(([docs.ids[j] for j in best], s[best]))
    return out


def test_topk_equals_brute_force(lite):
    docs = random_lexical(400, V, draws=(20, 200), seed=0)
    queries = random_lexical(8, V, draws=(5, 60), seed=1, ids=[f"q{i}" for i in range(8)])
    idx = MilvusIndex(WORDS, uri=lite / "exact.db", collection="exact")
    assert idx.ingest(docs, batch_size=128, progress=False) == {"written": 400, "skipped": 0}
    assert idx.count() == 400
    for k in (1, 10, 50):
        got = idx.search(queries, k=k, explain=0)
        for (ids, scores), hits in zip(brute_force(queries, docs, k), got):
            assert [h.id for h in hits] == ids
            np.testing.assert_allclose([h.score for h in hits], scores, rtol=1e-5, atol=1e-6)
    # one query given three ways (sparse pair, dict, dense vector) gives the same hits
    qi, qd = queries.row(3)
    dense = np.zeros(V, np.float32); dense[qi] = qd
    a = idx.search((qi, qd), k=10); b = idx.search(dict(zip(qi.tolist(), qd.tolist())), k=10); c = idx.search(dense, k=10)
    assert [h.id for h in a] == [h.id for h in b] == [h.id for h in c] == brute_force(queries, docs, 10)[3][0]
    # explanations come from the stored vector: all shared words add up to the score, largest first
    full = idx.search((qi, qd), k=3, explain=V)
    for h in full:
        contrib = [c for _, c in h.explanation]
        assert contrib == sorted(contrib, reverse=True)
        assert abs(sum(contrib) - h.score) < 1e-5
        d = docs.ids.index(h.id)
        shared = set(qi.tolist()) & set(docs.row(d)[0].tolist())
        assert {w for w, _ in h.explanation} == {WORDS[j] for j in shared}
    assert idx.search((np.array([], np.int64), np.array([], np.float32)), k=5) == []  # shares no word: no hit
    idx.close()


def test_query_fewer_matches_than_k(lite):
    "Only items sharing a word are hits: a one-word query gets exactly the items holding that word."
    docs = random_lexical(300, V, draws=(5, 30), seed=2)
    idx = MilvusIndex(WORDS, uri=lite / "few.db", collection="few")
    idx.ingest(docs, progress=False)
    word = int(docs.row(0)[0][0])
    holders = {docs.ids[i] for i in range(len(docs)) if word in docs.row(i)[0]}
    hits = idx.search({word: 1.0}, k=300)
    assert {h.id for h in hits} == holders and len(hits) < 300
    idx.close()


CHILD = textwrap.dedent("""
    import sys
    from lexvla.milvus import MilvusIndex, random_lexical
    uri, n = sys.argv[1], int(sys.argv[2])
    idx = MilvusIndex([f"word{j}" for j in range(2000)], uri=uri, collection="resume")
    upsert = idx.client.upsert
    def traced(*a, **kw):  # report each finished batch so the parent can kill us midway
        r = upsert(*a, **kw); print("batch", flush=True); return r
    idx.client.upsert = traced
    idx.ingest(random_lexical(n, 2000, draws=(20, 120), seed=7), batch_size=100, progress=False)
    print("done", flush=True)
""")


def test_killed_ingest_resumes_exactly(lite, tmp_path):
    n, uri = 3000, str(lite / "resume.db")
    child = subprocess.Popen([sys.executable, "-c", CHILD, uri, str(n)], stdout=subprocess.PIPE, text=True)
    batches = 0
    for line in child.stdout:  # wait for a few batches, then kill it hard in the middle of the ingest
        batches += line.strip() == "batch"
        if batches == 6:
            os.kill(child.pid, signal.SIGKILL)
            break
    child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL, "the ingest finished before it could be killed"
    sv = random_lexical(n, V, draws=(20, 120), seed=7)
    idx = MilvusIndex(WORDS, uri=uri, collection="resume")
    before = idx.count()
    assert 600 <= before < n  # a killed run left a partial collection
    stats = idx.ingest(sv, batch_size=250, progress=False)
    assert stats["written"] == n - before and stats["skipped"] == before
    assert idx.count() == n
    back = idx.to_sparse()
    assert sorted(back.ids) == sorted(sv.ids)  # no duplicates, no gaps
    order = {i: r for r, i in enumerate(back.ids)}
    for i in (0, 599, 1234, n - 1):  # written before and after the kill: stored as given
        r = order[sv.ids[i]]
        np.testing.assert_array_equal(back.row(r)[0], sv.row(i)[0])
        np.testing.assert_array_equal(back.row(r)[1], sv.row(i)[1])
    assert idx.ingest(sv, progress=False) == {"written": 0, "skipped": n}  # a finished run again writes nothing
    assert idx.count() == n
    idx.close()


def test_vocabulary_mismatch_is_refused(lite):
    docs = random_lexical(50, V, draws=(5, 30), seed=3)
    uri = lite / "vocab.db"
    MilvusIndex(WORDS, uri=uri, collection="vocab").ingest(docs, progress=False)
    other = WORDS[:-1] + ["zebra"]
    with pytest.raises(VocabularyMismatch, match="meaningless"):
        MilvusIndex(other, uri=uri, collection="vocab")
    with pytest.raises(VocabularyMismatch):
        MilvusIndex(WORDS[::-1], uri=uri, collection="vocab")  # same words, other indices
    with pytest.raises(VocabularyMismatch):
        MilvusIndex(WORDS, uri=uri, collection="vocab", fingerprint="another-model")

    class Vocab:  # the model's Vocabulary: its own fingerprint is what the collection records
        words = WORDS
        def fingerprint(self): return "fp-of-model-a"
    a = MilvusIndex(Vocab(), uri=uri, collection="by_vocab")
    a.ingest(docs, progress=False)
    assert MilvusIndex(WORDS, uri=uri, collection="by_vocab", fingerprint="fp-of-model-a").count() == 50
    with pytest.raises(VocabularyMismatch):
        MilvusIndex(WORDS, uri=uri, collection="by_vocab")  # json fingerprint != the Vocabulary's
    idx = MilvusIndex(WORDS, uri=uri, collection="vocab")
    with pytest.raises(VocabularyMismatch):
        idx.ingest(random_lexical(5, V + 1, draws=(3, 5)), progress=False)
    with pytest.raises(VocabularyMismatch):
        idx.search(random_lexical(2, V - 1, draws=(3, 5)), k=5)
    with pytest.raises(ValueError, match="length V=2000"):
        idx.search(np.ones(V + 1), k=5)
    assert vocab_fingerprint(WORDS) == idx.record["vocab_fingerprint"] and idx.record["V"] == V


def test_foreign_collection_and_bad_inputs(lite):
    from pymilvus import DataType
    uri = lite / "foreign.db"
    c = connect(uri)
    s = c.create_schema(auto_id=False, description="someone else's")
    s.add_field("id", DataType.VARCHAR, is_primary=True, max_length=64)
    s.add_field("vector", DataType.SPARSE_FLOAT_VECTOR)
    c.create_collection("theirs", schema=s)
    with pytest.raises(ValueError, match="not created by lexvla"):
        MilvusIndex(WORDS, uri=uri, collection="theirs")
    idx = MilvusIndex(WORDS, uri=uri, collection="ours", id_max_length=16)
    sv = random_lexical(3, V, draws=(3, 5))
    with pytest.raises(ValueError, match="occurs more than once"):
        idx.ingest(SparseVectors(indptr=sv.indptr, indices=sv.indices, data=sv.data, dim=V, ids=["a", "b", "a"]), progress=False)
    with pytest.raises(ValueError, match="ids is None"):
        idx.ingest(SparseVectors(indptr=sv.indptr, indices=sv.indices, data=sv.data, dim=V, ids=None), progress=False)
    with pytest.raises(ValueError, match="longer than 16 bytes"):
        idx.ingest(SparseVectors(indptr=sv.indptr, indices=sv.indices, data=sv.data, dim=V, ids=["a", "b", "c" * 17]), progress=False)
    with pytest.raises(ValueError, match="between 1 and"):
        idx.search({1: 1.0}, k=0)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        idx.search({V: 1.0}, k=1)
    with pytest.raises(KeyError, match="no collection"):
        MilvusIndex(WORDS, uri=uri, collection="absent", create=False)
    with pytest.raises(ValueError, match="ending in .db"):
        connect(lite / "not-a-db-file")


def test_exports_round_trip(lite, tmp_path):
    words = WORDS[:1000] + ["word5"] + WORDS[1001:]  # a repeated word (as the alpha2 filter can produce)
    docs = random_lexical(120, V, draws=(20, 200), seed=4)
    paths = export_jsonl(docs, words, tmp_path / "export", progress=False)
    same = read_jsonl(paths["vectors"], words)
    assert same.ids == docs.ids
    np.testing.assert_array_equal(same.indptr, docs.indptr)
    np.testing.assert_array_equal(same.indices, docs.indices)
    np.testing.assert_array_equal(same.data, docs.data)  # float export is bit-exact
    lines = paths["impact"].read_text().splitlines()
    assert len(lines) == len(docs)
    first = json.loads(lines[0])
    assert set(first) == {"id", "contents", "vector"} and all(type(v) is int and v > 0 for v in first["vector"].values())
    i0, d0 = docs.row(0)  # the impacts of item 0, checked against the rule floor(w * scale + 0.5) directly
    keys = export_keys(words)
    assert first["vector"] == {keys[j]: int(np.floor(float(w) * IMPACT_SCALE + 0.5))
                               for j, w in zip(i0.tolist(), d0.tolist()) if np.floor(float(w) * IMPACT_SCALE + 0.5) > 0}
    imp = read_jsonl(paths["impact"], words, scale=IMPACT_SCALE)
    kept = quantize(docs.data) > 0
    assert np.abs(imp.data - docs.data[kept]).max() <= 0.5 / IMPACT_SCALE + 1e-7
    meta = json.loads(paths["vocab"].read_text())
    assert meta["impact_scale"] == IMPACT_SCALE and meta["V"] == V and meta["words"] == words
    assert meta["vocab_fingerprint"] == vocab_fingerprint(words)
    assert keys[1000] == "word5#1000" and len(set(keys)) == V
    # a Qdrant-style import (indices through the words) and back: the same scores as the original vectors
    q = random_lexical(3, V, draws=(5, 40), seed=5)
    np.testing.assert_allclose((csr(q) @ csr(same).T).toarray(), (csr(q) @ csr(docs).T).toarray(), rtol=1e-6)
    # what a collection holds exports the same way
    idx = MilvusIndex(words, uri=lite / "export.db", collection="export")
    idx.ingest(docs, progress=False)
    stored = idx.to_sparse()
    p2 = export_jsonl(stored, words, tmp_path / "from_milvus", progress=False)
    by_id = {json.loads(l)["id"]: l for l in p2["vectors"].read_text().splitlines()}
    assert by_id == {json.loads(l)["id"]: l for l in paths["vectors"].read_text().splitlines()}
    with pytest.raises(KeyError, match="not in the vocabulary"):
        read_jsonl(paths["vectors"], WORDS[:10])


def fake_variant(folder, n=30, lexical=True):
    "An evaluated variant's vectors file (the layout of `lexvla.evaluate.save_vectors`), caption i of image i."
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {"lexical": np.array(lexical), "words": np.array(WORDS),
              "images": np.array([f"images/{i:03d}.jpg" for i in range(n)]),
              "captions": np.array([f"caption {i}" for i in range(n)]), "txt2img": np.arange(n)}
    for name, sv in (("image", random_lexical(n, V, draws=(20, 120), seed=11)),
                     ("text", random_lexical(n, V, draws=(5, 30), seed=12))):
        arrays.update({f"{name}.indptr": sv.indptr, f"{name}.indices": sv.indices, f"{name}.values": sv.data,
                       f"{name}.shape": np.array([n, V])})
    np.savez(folder / "vectors.npz", **arrays)


def test_search_stage(lite, tmp_path, capsys):
    "The DVC stage through its command line (lexvla.search): exact top-k, idempotent, one-line user errors."
    import yaml
    from lexvla.search import main
    fake_variant(tmp_path / "evaluate" / "demo" / "lexvla")  # results/evaluate/<set>/<variant>/
    fake_variant(tmp_path / "evaluate" / "demo" / "dense", lexical=False)
    search = {"variant": "lexvla", "set": "demo", "uri": str(lite / "stage.db"), "collection": "stage", "topk": 16,
              "k": 5, "n_queries": 20, "explain": 3, "impact_scale": 1000}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"search": search}))
    args = ["--params", str(tmp_path / "params.yaml"), "--evaluate", str(tmp_path / "evaluate"),
            "--out", str(tmp_path / "search")]
    assert main(args) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["items"] == printed["stored"] == 30 and printed["queries"] == 20
    assert printed["topk_equals_brute_force"] == 1.0
    summary = (tmp_path / "search" / "summary.json").read_text()
    assert json.loads(summary)["exports"] == {"vectors": "export/vectors.jsonl", "impact": "export/impact.jsonl",
                                              "vocab": "export/vocab.json"}
    assert main(args) == 0  # again: nothing ingested, the same summary
    assert json.loads((tmp_path / "runs" / "search.json").read_text())["ingest"] == {"written": 0, "skipped": 30}
    assert (tmp_path / "search" / "summary.json").read_text() == summary
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"search": {**search, "variant": "dense"}}))
    capsys.readouterr()
    assert main(args) == 2
    assert capsys.readouterr().err.splitlines()[-1].startswith("lexvla.search error: search.variant: 'dense'")
