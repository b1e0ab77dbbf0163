"""Benchmark of the exact, explained inverted index (`lexvla.index`) against dense brute force, scipy sparse
products, the Seismic learned-sparse-retrieval engine (`pyseismic-lsr`, approximate) and Block-Max Pruning (`bmp`,
exact only for its integer impacts), on the trained model's real vectors and at 10k, 100k and 1M synthetic items.

    .venv/bin/python benchmarks/bench_index.py                       # the committed table
    .venv/bin/python benchmarks/bench_index.py --sizes 10000 --queries 20 --real '' --out /tmp/x.md

Data: synthetic lexical vectors with realistic word statistics: V = 20,000 words used with Zipf-like frequencies
(P(word of rank r) ~ 1/r, the ranks shuffled over the vocabulary), each item with 300-1,100 distinct active words
(uniform), L2-normalised log-normal weights; queries with 20-60 active words drawn from the same word frequencies.
Generated in chunks of 10k items, so 1M items (~7e8 postings) never needs more than the CSR itself. Real: the
evaluate stage's vectors of the trained embedded LexVLA model (`results/evaluate/lexvla/vectors.npz`), its test
images as items and its test captions as queries.

Exact answer: an independent reference, scipy float64 products over chunks of 100k items (so 1M items never needs a
float64 copy of the whole CSR). Recall@10 of every method, the inverted index included, is measured against it, with
ties: a hit counts when its exact score reaches the exact 10th best (within float32 rounding). For the index, the
ids, their order and the float64 scores are also compared with the reference's for equality.
Latency is per query, single process, each timed call run `--reps` times and its median taken: the index (numba,
its shards spread over the cores), Seismic (one thread) and BMP query one at a time; the index's batch search and
scipy and dense score the whole batch of queries in one call, and their time is divided by the number of queries.
Memory is the bytes of each method's data structure (Seismic: the growth of the process's resident memory while it
builds; BMP: while its index file loads); for the index also the peak resident memory of a fresh process that loads
the saved index and answers every query.
"""
from __future__ import annotations

import argparse
import gc
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from lexvla.index import InvertedIndex  # noqa: E402
from lexvla.sparse import SparseVectors  # noqa: E402

V = 20_000


def rss() -> int:
    "Resident memory of this process, bytes."
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"): return int(line.split()[1]) * 1024
    return 0


def mem_available() -> int:
    "MemAvailable of the machine, bytes."
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"): return int(line.split()[1]) * 1024
    return 0


def zipf_p(V: int, a: float, perm: np.ndarray) -> np.ndarray:
    "Word probabilities: rank r has weight 1/r**a; ranks placed on word indices by `perm`."
    w = 1.0 / np.arange(1, V + 1) ** a
    p = np.empty(V); p[perm] = w / w.sum()
    return p


def draws_for(p: np.ndarray, targets: np.ndarray) -> np.ndarray:
    "Draws with replacement whose expected number of distinct words is each target."
    m = np.arange(1, 20_000, 5)
    distinct = np.array([np.sum(-np.expm1(mm * np.log1p(-p))) for mm in m])  # E[distinct] = sum 1-(1-p)^m
    return np.interp(targets, distinct, m).astype(np.int64)


def items(n: int, p: np.ndarray, seed: int, active=(300, 1100), chunk: int = 5_000) -> SparseVectors:
    "n items with `active` distinct Zipf-distributed words each (in expectation), generated chunk by chunk."
    rng = np.random.default_rng(seed)
    # a draw is one lookup
    alias_words = np.repeat(np.arange(len(p), dtype=np.int32), np.round(p * (1 << 20)).astype(np.int64))
    table = draws_for(p, np.arange(active[0], active[1] + 1))
    counts, indices, data = [], [], []
    seen = np.zeros(chunk * len(p), bool)  # (row, word) marks: duplicates merged without a sort
    for s in range(0, n, chunk):
        b = min(chunk, n - s)
        m = table[rng.integers(0, len(table), size=b)]
        rows = np.repeat(np.arange(b, dtype=np.int64) * len(p), m)
        rows += alias_words[rng.integers(0, len(alias_words), size=m.sum())]
        seen[rows] = True
        flat = seen[:b * len(p)]
        key = np.flatnonzero(flat); cnt = flat.reshape(b, len(p)).sum(1); flat[key] = False
        r = np.repeat(np.arange(b), cnt)
        c = (key - r * len(p)).astype(np.int32)
        w = np.exp(rng.standard_normal(size=len(c), dtype=np.float32))  # log-normal weights
        w /= np.sqrt(np.bincount(r, weights=w * w, minlength=b)).astype(np.float32)[r]
        counts.append(cnt); indices.append(c); data.append(w)
        del rows, key, r, c, w
    indptr = np.zeros(n + 1, np.int64); np.cumsum(np.concatenate(counts), out=indptr[1:])
    return SparseVectors(indptr, np.concatenate(indices), np.concatenate(data), len(p), None, check=False)


def queries(nq: int, p: np.ndarray, seed: int, active=(20, 60)) -> SparseVectors:
    "nq queries with 20-60 distinct words drawn (without replacement) by word frequency."
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(nq):
        w = np.sort(rng.choice(len(p), size=rng.integers(active[0], active[1] + 1), replace=False, p=p))
        x = rng.lognormal(0.0, 1.0, size=len(w)); rows.append((w, x / np.linalg.norm(x)))
    indptr = np.cumsum([0] + [len(w) for w, _ in rows])
    return SparseVectors(indptr, np.concatenate([w for w, _ in rows]), np.concatenate([x for _, x in rows]), len(p))


def topk_rows(scores: np.ndarray, k: int) -> list[np.ndarray]:
    "Top-k rows of each column of an (n, q) score matrix."
    part = np.argpartition(-scores, k - 1, axis=0)[:k]
    return [part[np.argsort(-scores[part[:, j], j], kind="stable"), j] for j in range(scores.shape[1])]


class Exact:
    "The exact top-k of every query by an independent method: scipy float64 products over chunks of items."
    def __init__(self, sv: SparseVectors, qs: SparseVectors, k: int, chunk: int = 100_000):
        qd = qs.to_dense().astype(np.float64).T  # (V, nq)
        self.csr, self.qd, self.k = sv.to_scipy(), qd, k
        best_s = np.full((k, qd.shape[1]), -np.inf); best_r = np.zeros((k, qd.shape[1]), np.int64)
        for s in range(0, len(sv), chunk):  # memory: one (chunk, nq) float64 block at a time
            sc = self.csr[s:s + chunk].astype(np.float64) @ qd
            sc[sc <= 0] = -np.inf  # an item that shares no word is not a hit
            cand_s = np.vstack([best_s, sc])
            cand_r = np.vstack([best_r, np.arange(s, s + len(sc))[:, None].repeat(qd.shape[1], 1)])
            top = np.argsort(-cand_s, axis=0, kind="stable")[:k]
            best_s, best_r = np.take_along_axis(cand_s, top, 0), np.take_along_axis(cand_r, top, 0)
        self.scores, self.rows = best_s.T, best_r.T  # (nq, k), best first
        self.n_match = np.isfinite(self.scores).sum(1)

    def score(self, q: int, rows) -> np.ndarray:
        "Exact float64 scores of `rows` for query `q`."
        return (self.csr[np.asarray(rows, np.int64)].astype(np.float64) @ self.qd[:, q]) if len(rows) else np.zeros(0)

    def recall(self, got: list, rtol: float = 1e-5) -> float:
        "Recall@k with ties: a hit counts when its exact score reaches the exact k-th best (within float32 rounding)."
        out = []
        for q, g in enumerate(got):
            n = int(self.n_match[q])
            if n == 0: out.append(1.0 if not len(g) else 0.0); continue
            kth = self.scores[q, min(self.k, n) - 1]
            g = list(dict.fromkeys(map(int, g[:self.k])))  # an id returned twice counts once
            out.append(float((self.score(q, g) >= kth - rtol * abs(self.scores[q, 0])).sum()) / min(self.k, n))
        return float(np.mean(out))


def recall(got: list, exact: "Exact", k: int) -> float:
    return exact.recall(got)


def gb(b: float) -> str: return f"{b / 1e9:.2f} GB"


def timed(fn, reps: int) -> tuple[float, object]:
    "Median wall time of `reps` calls of fn (the first result is returned)."
    out, ts = None, []
    for r in range(reps):
        t = time.perf_counter(); res = fn(); ts.append(time.perf_counter() - t)
        if r == 0: out = res
    return float(np.median(ts)), out


def scipy_brute(csr, qs: SparseVectors, k: int) -> list[np.ndarray]:
    qd = qs.to_dense().T  # (V, nq) float32
    sc = csr @ qd
    return topk_rows(sc, k)


def bench_index_engine(sv, qs, k, exact, n, dtype, reps, scipy_lat):
    "The index: build, per-query latency (median over queries of the median of `reps` runs), batch, exactness."
    nq = len(qs)
    r0 = rss(); t0 = time.perf_counter()
    idx = InvertedIndex.build(sv, [f"w{i}" for i in range(sv.dim)], dtype=dtype)
    build = time.perf_counter() - t0; grow = rss() - r0
    idx.search(qs.row(0), k=k)  # compile (or load the cached machine code) before timing
    idx.search(qs, k=k, explain=0)
    lat, got, scores = [], [], []
    for i in range(nq):
        t, hits = timed(lambda: idx.search(qs.row(i), k=k, explain=5 if dtype == "float32" else 0), reps)
        lat.append(t); got.append([h.row for h in hits]); scores.append([h.score for h in hits])
    noexp = [timed(lambda: idx.search(qs.row(i), k=k, explain=0), reps)[0] for i in range(nq)]
    batch, bhits = timed(lambda: idx.search(qs, k=k, explain=0), reps)
    same_batch = [[h.row for h in hs] for hs in bhits] == got
    ids_ok = all(g == e[:len(g)].tolist() and len(g) == min(k, m) for g, e, m in zip(got, exact.rows, exact.n_match))
    scores_ok = all(s == e[:len(s)].tolist() for s, e in zip(scores, exact.scores))
    med = float(np.median(lat))
    if dtype == "float32":
        method, note = "lexvla.index (float32, explained)", "exact, compiled exhaustive (numba); " + (
            "ids, order and float64 scores identical to the reference" if ids_ok and scores_ok else
            f"DIFFERS from the reference (ids {ids_ok}, scores {scores_ok})")
        lat_note = (f"mean {np.mean(lat) * 1e3:.1f} ms; without explanations {np.median(noexp) * 1e3:.1f} ms; "
                    f"batch of {nq}: {batch / nq * 1e3:.1f} ms/query{'' if same_batch else ' (DIFFERS)'}")
    else:
        method, note = "lexvla.index (float16 weights)", "exact for the float16-rounded vectors"
        lat_note = "no explanations"
    if scipy_lat: note += f"; scipy's latency / this one: {scipy_lat / med:.1f}x"
    row = dict(n=n, method=method, build=build, mem=idx.nbytes, lat=med, lat_note=lat_note,
               recall=exact.recall(got), exact_ids=ids_ok, exact_scores=scores_ok, batch_same=same_batch,
               lat_noexp=float(np.median(noexp)), lat_batch=batch / nq, build_rss=grow, note=note)
    print(f"[{n}] index {dtype} built in {build:.1f} s, {gb(idx.nbytes)}, {med * 1e3:.1f} ms/query", file=sys.stderr)
    return row, idx


def serve_rss(idx, qs: SparseVectors, k: int) -> int:
    "Peak resident memory of a fresh process that loads the saved index and answers every query (explained)."
    import json, subprocess, tempfile
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as d:
        idx.save(Path(d) / "ix"); qs.save(Path(d) / "q.npz")
        code = ("import sys, json; sys.path.insert(0, %r)\n"
                "from lexvla.index import InvertedIndex\nfrom lexvla.sparse import SparseVectors\n"
                "ix = InvertedIndex.load(sys.argv[1]); qs = SparseVectors.load(sys.argv[2])\n"
                "for i in range(len(qs)): ix.search(qs.row(i), k=%d)\nix.search(qs, k=%d)\n"
                "print(json.dumps(int(open('/proc/self/status').read().split('VmHWM:')[1].split()[0]) * 1024))"
                % (str(ROOT), k, k))
        out = subprocess.run([sys.executable, "-c", code, str(Path(d) / "ix"), str(Path(d) / "q.npz")],
                             capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_size(n: int, nq: int, k: int, p: np.ndarray, dense_max_gb: float, seismic: bool, seed: int,
               reps: int = 3, bmp_on: bool = True, data=None, label=None) -> list[dict]:
    rows = []
    t0 = time.perf_counter()
    sv, qs = data if data is not None else (items(n, p, seed), queries(nq, p, seed + 1))
    n, nq = len(sv), len(qs)
    print(f"[{n}] {sv.nnz:,} postings (mean {sv.mean_active():.0f} active) in {time.perf_counter() - t0:.1f} s",
          file=sys.stderr)

    # --- the reference: exact float64 top-k by chunked scipy products (independent of every method below)
    t0 = time.perf_counter(); exact = Exact(sv, qs, k)
    print(f"[{n}] exact float64 reference in {time.perf_counter() - t0:.1f} s", file=sys.stderr)

    # --- scipy: one sparse x dense product for the whole batch (first: the index rows quote the ratio)
    csr = sv.to_scipy()
    s_lat, got = timed(lambda: scipy_brute(csr, qs, k), reps)
    s_lat /= nq
    scipy_row = dict(n=n, method="scipy CSR @ dense queries (float32)", build=0.0,
                     mem=csr.data.nbytes + csr.indices.nbytes + csr.indptr.nbytes, lat=s_lat,
                     lat_note=f"batch of {nq} / {nq}", recall=exact.recall(got), note="brute force over every posting")

    # --- the index (exact: its recall, ids and scores are measured, not assumed)
    row, idx = bench_index_engine(sv, qs, k, exact, n, "float32", reps, s_lat)
    t0 = time.perf_counter(); row["serve_rss"] = serve_rss(idx, qs, k)
    row["note"] += f"; serving process peak RSS {gb(row['serve_rss'])} (load + queries)"
    print(f"[{n}] serving peak RSS {gb(row['serve_rss'])} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    rows.append(row)
    del idx; gc.collect()
    row16, idx16 = bench_index_engine(sv, qs, k, exact, n, "float16", reps, s_lat)
    rows.append(row16)
    del idx16; gc.collect()
    rows.append(scipy_row)

    # --- dense brute force: the full (n, V) float32 matrix
    need = n * sv.dim * 4
    if need <= dense_max_gb * 1e9:
        dense = sv.to_dense(); qd = qs.to_dense().T
        t = time.perf_counter(); sc = dense @ qd; d_lat = (time.perf_counter() - t) / nq
        got = topk_rows(sc, k); del sc, dense
        rows.append(dict(n=n, method="dense matmul (float32, BLAS)", build=0.0, mem=need, lat=d_lat,
                         lat_note=f"batch of {nq} / {nq}", recall=exact.recall(got), note=""))
    else:
        rows.append(dict(n=n, method="dense matmul (float32, BLAS)", build=None, mem=need, lat=None, lat_note="",
                         recall=None, note=f"skipped: the dense matrix needs {gb(need)} (> {dense_max_gb:g} GB cap)"))
    gc.collect()

    # --- Seismic (approximate; Rust): its dataset copies every posting, so check the memory first
    if seismic:
        need = sv.nnz * 12 + 2e9
        if mem_available() < need:
            rows.append(dict(n=n, method="pyseismic-lsr 0.5.4 (approximate)", build=None, mem=None, lat=None,
                             lat_note="", recall=None,
                             note=f"skipped: needs ~{gb(need)} free, {gb(mem_available())} available"))
        else: rows.append(bench_seismic(sv, qs, k, exact, n))
    # --- BMP (block-max pruning over 8-bit impacts; Rust)
    if bmp_on: rows.append(bench_bmp(sv, qs, k, exact, n))
    del sv, csr; gc.collect()
    if label:
        for r in rows: r["n"] = label
    return rows


def bench_bmp(sv: SparseVectors, qs: SparseVectors, k: int, exact: "Exact", n: int) -> dict:
    "bmp 0.2.8 with alpha = beta = 1 (its exact setting): exact for its integer impacts, measured against floats."
    try:
        import bmp
    except ImportError as e:
        return dict(n=n, method="bmp", build=None, mem=None, lat=None, lat_note="", recall=None,
                    note=f"not installed: {e}")
    import tempfile
    method = f"bmp {BMP['version']} (alpha = beta = 1)"
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as d:
        path = str(Path(d) / "index.bmp")
        t0 = time.perf_counter()
        scale = 255 / float(sv.data.max())  # 8-bit impacts: the largest weight is 255, every posting at least 1
        ix = bmp.InvertedIndexer(path, BMP["bsize"], False)
        imp = np.maximum(1, np.rint(sv.data * scale)).astype(np.int64)
        for i in range(len(sv)):
            a, e = sv.indptr[i], sv.indptr[i + 1]
            ix.add_document(str(i), list(zip(sv.indices[a:e].tolist(), imp[a:e].tolist())))
        del imp
        csc = sv.to_scipy().tocsc()
        cimp = np.maximum(1, np.rint(csc.data * scale)).astype(np.int64)
        for j in range(sv.dim):
            a, e = csc.indptr[j], csc.indptr[j + 1]
            ix.add_term(str(j), list(zip(csc.indices[a:e].tolist(), cimp[a:e].tolist())))
        del csc, cimp
        ix.finish(); del ix; gc.collect()
        r0 = rss(); searcher = bmp.Searcher(path); mem = rss() - r0
        build = time.perf_counter() - t0
    got, lat, same = [], [], []
    for i in range(len(qs)):
        qi, qw = qs.row(i)
        q = {str(j): float(w) for j, w in zip(qi.tolist(), qw.tolist())}
        t = time.perf_counter(); ids, _ = searcher.search(q, k, 1.0, 1.0); lat.append(time.perf_counter() - t)
        got.append([int(x) for x in ids])
        same.append(got[-1] == exact.rows[i][:int(min(k, exact.n_match[i]))].tolist())
    del searcher; gc.collect()
    return dict(n=n, method=method, build=build, mem=mem, lat=float(np.median(lat)), lat_note="1 query at a time",
                recall=exact.recall(got), note=f"bsize={BMP['bsize']}, impacts = round(255 w / max w) >= 1; "
                f"exact top-10 ids in order for {np.mean(same):.0%} of queries (integer scores, not the float ones); "
                "memory = RSS growth on load")


def bench_seismic(sv: SparseVectors, qs: SparseVectors, k: int, exact: list, n: int) -> dict:
    try:
        import seismic as sm
        from seismic import SeismicDataset, SeismicIndex
    except ImportError as e:
        return dict(n=n, method="pyseismic-lsr", build=None, mem=None, lat=None, lat_note="", recall=None,
                    note=f"not installed: {e}")
    r0 = rss(); t0 = time.perf_counter()
    ds = SeismicDataset()
    step = 50_000
    for s in range(0, len(sv), step):  # components must be int64: convert chunk by chunk
        e = min(s + step, len(sv)); a, b = sv.indptr[s], sv.indptr[e]
        ds.add_documents_by_id([str(i) for i in range(s, e)], sv.indices[a:b].astype(np.int64), sv.data[a:b],
                               (sv.indptr[s:e + 1] - a).astype(np.int64))
    import contextlib, io
    devnull = os.open(os.devnull, os.O_WRONLY); saved = os.dup(1)
    os.dup2(devnull, 1)  # Seismic prints its build log on the C-level stdout
    try:
        index = SeismicIndex.build_from_dataset(ds, n_postings=SEISMIC["n_postings"],
                                                centroid_fraction=SEISMIC["centroid_fraction"],
                                                summary_energy=SEISMIC["summary_energy"], num_threads=0)
    finally:
        os.dup2(saved, 1); os.close(devnull); os.close(saved)
    del ds; gc.collect()
    build = time.perf_counter() - t0; mem = rss() - r0
    st = sm.get_seismic_string()
    got, lat = [], []
    for i in range(len(qs)):
        qi, qw = qs.row(i)
        comps = np.array([str(j) for j in qi]).astype(st)
        t = time.perf_counter()
        res = index.search(str(i), comps, qw.astype(np.float32), k, query_cut=len(qi),
                           heap_factor=SEISMIC["heap_factor"])
        lat.append(time.perf_counter() - t)
        got.append([int(d) for _, _, d in res])
    del index; gc.collect()
    cfg = ", ".join(f"{a}={b}" for a, b in SEISMIC.items())
    return dict(n=n, method="pyseismic-lsr 0.5.4 (approximate)", build=build, mem=mem, lat=float(np.median(lat)),
                lat_note="1 query at a time", recall=recall(got, exact, k), note=f"{cfg}; memory = RSS growth")


# Seismic's defaults (n_postings=3500, centroid_fraction=0.1) took 190 s to build 10k items here: its summaries cost
# ~20 us per kept posting for items of ~700 words. Its pruning keeps about n_postings x V postings whatever the size.
SEISMIC = {"n_postings": 300, "centroid_fraction": 0.02, "summary_energy": 0.4, "heap_factor": 0.8}
BMP = {"version": "0.2.8", "bsize": 32}


NOTES = """
## Reading the table

- **Exact means equal.** `lexvla.index` is checked against the float64 reference for each query: the same ids, in
  the same order (score descending, then row ascending for ties), and the same float64 scores, bit for bit. It
  accumulates each query word's float32 x float32 products (exact in float64) in ascending word order, which is
  the reference's own sequence of operations; the notes column says whether the check held.
- **No dynamic pruning.** The index is a compiled exhaustive term-at-a-time over shards of 65,536 items, with the
  long lists stored as dense columns (scored in one vectorised pass) and the rest as uint16 rows and float32
  weights. MaxScore and block-max WAND bounds are loose on these vectors (at 100k items a query's words' maximum
  contributions sum to 10-14 times its 10th best score, and 99-100% of 64-item blocks have a bound above it), so
  they would keep almost every posting; see the notebook `09_index` for the measurements.
- **BMP is exact for integers, not for these floats.** `bmp` quantises item weights to 8 bits and query weights to
  at most 32 levels and adds 16-bit integer scores; with `alpha = beta = 1` it computes the exact top 10 of those
  integer scores, so its float recall stays below 1 and its order matches the float order for a minority of queries.
  Exactness after rescoring would need a quantisation error bound for every item, of the order of the gaps between
  the best scores. It is not run at 1M items: its Python builder passes every posting twice as tuples.
- **Seismic is approximate** by design (recall 0.998 at 1M items with the settings shown).
- The scale-out path is `lexvla.milvus` (`benchmarks/results/milvus.md`).
"""


def table(rows: list[dict], meta: dict) -> str:
    f = lambda v, fmt: "–" if v is None else fmt(v)
    out = [f"# Inverted index benchmark (`benchmarks/bench_index.py`)", "",
           *[f"- {k}: {v}" for k, v in meta.items()], "",
           "| items | method | build (s) | memory | query latency (median) | recall@10 vs exact | notes |",
           "|---:|---|---:|---:|---:|---:|---|"]
    for r in rows:
        lat = f((r["lat"]), lambda v: f"{v * 1e3:.1f} ms") + (
            f" ({r['lat_note']})" if r["lat_note"] and r["lat"] is not None else "")
        items_ = f"{r['n']:,}" if isinstance(r["n"], int) else r["n"]
        out.append(f"| {items_} | {r['method']} | {f(r['build'], lambda v: f'{v:.1f}')} | {f(r['mem'], gb)} | {lat} | "
                   f"{f(r['recall'], lambda v: f'{v:.3f}')} | {r['note']} |")
    return "\n".join(out) + "\n"


def real_data(path: Path, nq: int | None) -> tuple[SparseVectors, SparseVectors]:
    "The trained model's test images (items) and test captions (queries), from the evaluate stage's vectors."
    from lexvla.sparse import load_vectors
    d = load_vectors(path)
    img, txt = d["image"], d["text"]
    if nq: txt = txt[:nq]
    return (SparseVectors(img.indptr, img.indices, img.data, img.shape[1]),
            SparseVectors(txt.indptr, txt.indices, txt.data, txt.shape[1]))


def loadavg() -> str:
    return " ".join(open("/proc/loadavg").read().split()[:3])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="*", default=[10_000, 100_000, 1_000_000])
    ap.add_argument("--queries", type=int, default=50, help="queries per size")
    ap.add_argument("-k", type=int, default=10)
    ap.add_argument("--reps", type=int, default=3, help="runs of each timed call (their median is taken)")
    ap.add_argument("--dense-max-gb", type=float, default=4.0, help="skip dense brute force above this matrix size")
    ap.add_argument("--no-seismic", action="store_true")
    ap.add_argument("--seismic-max", type=int, default=1_000_000, help="largest size Seismic is run at")
    ap.add_argument("--no-bmp", action="store_true")
    ap.add_argument("--bmp-max", type=int, default=100_000,
                    help="largest size BMP is run at (its builder holds every posting twice, as Rust tuples)")
    ap.add_argument("--real", default=str(ROOT / "results" / "evaluate" / "lexvla" / "vectors.npz"),
                    help="the evaluate stage's vectors of the trained model ('' to skip)")
    ap.add_argument("--real-queries", type=int, default=1000, help="test captions used as queries")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "index.md"))
    ap.add_argument("--json", default=None, help="also write the rows as JSON here (the tests read it)")
    a = ap.parse_args(argv)
    p = zipf_p(V, 1.0, np.random.default_rng(12345).permutation(V))
    t0 = time.perf_counter()
    load0 = loadavg()
    rows = []
    if a.real and Path(a.real).is_file():
        sv, qs = real_data(Path(a.real), a.real_queries)
        rows += bench_size(len(sv), len(qs), a.k, p, a.dense_max_gb, not a.no_seismic, a.seed, a.reps,
                           not a.no_bmp, data=(sv, qs), label=f"{len(sv):,} (real LexVLA)")
        del sv, qs
    for n in a.sizes:
        rows += bench_size(n, a.queries, a.k, p, a.dense_max_gb, not a.no_seismic and n <= a.seismic_max, a.seed,
                           a.reps, not a.no_bmp and n <= a.bmp_max)
    import numba
    meta = {"machine": f"{platform.machine()}, {os.cpu_count()} CPU cores (shared with other jobs while measured: "
                       f"load average {load0} at the start, {loadavg()} at the end), "
                       f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB RAM; "
                       f"numpy {np.__version__}, numba {numba.__version__} ({numba.get_num_threads()} threads)",
            "data": f"synthetic: V = {V:,} words, Zipf-like word use (1/rank), 300-1,100 active words per item, "
                    f"{a.queries} queries of 20-60 words; k = {a.k}" + (
                        f"; real: the trained embedded LexVLA model's test images as items and the first "
                        f"{a.real_queries} test captions as queries ({Path(a.real).relative_to(ROOT)})"
                        if a.real and Path(a.real).is_file() and Path(a.real).is_relative_to(ROOT) else ""),
            "timing": f"every timed call run {a.reps} times, its median taken; per-query latency is the median over "
                      "the queries",
            "total wall time": f"{time.perf_counter() - t0:.0f} s",
            "peak resident memory (the whole benchmark)":
                gb(int(open('/proc/self/status').read().split('VmHWM:')[1].split()[0]) * 1024)}
    md = table(rows, meta) + NOTES
    print(md)
    if a.out:
        out = Path(a.out); out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp"); tmp.write_text(md); tmp.replace(out)
    if a.json:
        import json
        Path(a.json).write_text(json.dumps(rows, indent=1, default=float) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
