"""lexvla.sparse against plain references: sparsification, CSR round trips, explanations, statistics."""
import math

import numpy as np
import pytest
import scipy.sparse as sps
import torch

from lexvla.sparse import SparseVectors, explain, sparsity_stats, threshold_for


def _ref_keep(row, threshold, topk):
    "Plain per-row reference: candidates, then the k largest by (value desc, index asc)."
    cand = [j for j, v in enumerate(row) if (v > threshold if threshold is not None else v != 0)]
    if topk is not None: cand = sorted(cand, key=lambda j: (-row[j], j))[:topk]
    return sorted(cand)


@pytest.mark.parametrize("threshold,topk", [(None, None), (0.5, None), (None, 3), (0.5, 3), (None, 1), (1.5, 50)])
def test_from_dense_matches_reference(threshold, topk):
    rng = np.random.default_rng(1)
    x = np.round(rng.random((40, 25)) * 4) / 2  # many ties and zeros
    x[rng.random(x.shape) < 0.3] = 0
    sv = SparseVectors.from_dense(torch.as_tensor(x), threshold=threshold, topk=topk, chunk=6)
    assert sv.indptr.dtype == np.int64 and sv.indices.dtype == np.int32 and sv.data.dtype == np.float32
    for i, row in enumerate(x):
        idx, w = sv.row(i)
        assert idx.tolist() == _ref_keep(row.tolist(), threshold, topk)
        np.testing.assert_array_equal(w, row[idx].astype(np.float32))


def test_from_dense_errors():
    with pytest.raises(ValueError, match="NaN"): SparseVectors.from_dense(np.array([[np.nan, 1.0]]))
    with pytest.raises(ValueError, match="topk must be positive"): SparseVectors.from_dense(np.ones((2, 3)), topk=0)
    with pytest.raises(ValueError, match=r"\(n, v\)"): SparseVectors.from_dense(np.ones(3))


def test_scipy_round_trip_and_concat():
    m = sps.random(30, 50, density=0.2, format="csr", random_state=3, dtype=np.float32)
    sv = SparseVectors.from_scipy(m, ids=list(range(30)))
    np.testing.assert_array_equal(sv.to_scipy().toarray(), m.toarray())
    np.testing.assert_array_equal(sv.to_dense(), m.toarray())
    a = SparseVectors.from_scipy(m[:10], ids=list(range(10)))
    b = SparseVectors.from_scipy(m[10:], ids=list(range(10, 30)))
    c = SparseVectors.concat([a, b])
    assert c.ids == sv.ids
    for f in ("indptr", "indices", "data"): np.testing.assert_array_equal(getattr(c, f), getattr(sv, f))
    # unsorted COO with a duplicate: summed and sorted
    coo = sps.coo_matrix(([1.0, 2.0, 3.0], ([0, 0, 0], [4, 1, 4])), shape=(1, 5))
    r = SparseVectors.from_scipy(coo)
    assert r.row(0)[0].tolist() == [1, 4] and r.row(0)[1].tolist() == [2.0, 4.0]
    with pytest.raises(ValueError, match="with ids and vectors without"):
        SparseVectors.concat([a, SparseVectors.from_scipy(m[:2])])


@pytest.mark.parametrize("ids", [None, ["x", "y", "z", "w"], [5, 6, 7, 8], ["1", "b", "c", "d"]])
def test_save_load(tmp_path, ids):
    sv = SparseVectors.from_dense(np.random.default_rng(0).random((4, 9)) * (np.arange(9) % 2), ids=ids)
    back = SparseVectors.load(sv.save(tmp_path / "sub" / "v.npz"))
    assert back.ids == sv.ids and back.dim == 9 and len(back) == 4
    for f in ("indptr", "indices", "data"): np.testing.assert_array_equal(getattr(back, f), getattr(sv, f))
    with np.load(tmp_path / "sub" / "v.npz", allow_pickle=False) as z:  # no object arrays anywhere
        assert all(z[k].dtype != object for k in z.files)
    assert not list((tmp_path / "sub").glob("*.tmp*"))


def test_load_rejects_other_files(tmp_path):
    np.savez(tmp_path / "x.npz", a=np.ones(3))
    with pytest.raises(ValueError, match="not a SparseVectors file"): SparseVectors.load(tmp_path / "x.npz")


@pytest.mark.parametrize("args,match", [
    (([0, 2], [3, 3], [1, 1], 5), "strictly increasing"),
    (([0, 2, 3], [1, 3, 0], [1, 1, 1], 4), None),  # a new row may start lower
    (([0, 1], [-1], [1], 5), "outside the vocabulary"),
    (([0, 3], [1, 2], [1, 1], 5), "indptr ends at 3"),
    (([0, 1], [1], [np.inf], 5), "finite"),
])
def test_validation(args, match):
    if match is None: SparseVectors(*args); return
    with pytest.raises(ValueError, match=match): SparseVectors(*args)


def test_explain_sums_to_dot_product():
    rng = np.random.default_rng(7)
    V = 200
    words = [f"w{i}" for i in range(V)]
    q = SparseVectors.from_dense(rng.random((5, V)) * (rng.random((5, V)) < 0.1))
    d = SparseVectors.from_dense(rng.random((8, V)) * (rng.random((8, V)) < 0.3))
    dot = q.to_dense().astype(np.float64) @ d.to_dense().T.astype(np.float64)
    for i in range(len(q)):
        for j in range(len(d)):
            allw = explain(*q.row(i), *d.row(j), words, top=None)
            assert math.isclose(math.fsum(c for _, c in allw), dot[i, j], rel_tol=1e-12, abs_tol=1e-15)
            cs = [c for _, c in allw]
            assert cs == sorted(cs, reverse=True)
            assert explain(*q.row(i), *d.row(j), words, top=3) == allw[:3]
            assert {w for w, _ in allw} == {words[k] for k in set(q.row(i)[0].tolist()) & set(d.row(j)[0].tolist())}


def test_sparsity_stats():
    V = 1000
    x = np.zeros((3, V), np.float32); x[0, :10] = 1; x[1, :20] = 1; x[2, :30] = 1
    st = sparsity_stats(x)
    assert st["mean_active"] == 20 and st["sparsity"] == 1 - 20 / V
    assert math.isclose(st["quadratic_sparsity"], (1 - 20 / V) ** 2)
    assert sparsity_stats(SparseVectors.from_dense(x)) == st
    assert sparsity_stats(torch.as_tensor(x), V=2000)["sparsity"] == 1 - 20 / 2000
    assert threshold_for(10000) == 0.01
