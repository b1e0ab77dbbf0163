"""Benchmark of the explainable inverted index (`lexvla.index`) against dense brute force, scipy sparse products and
the Seismic learned-sparse-retrieval engine (`pyseismic-lsr`), at 10k, 100k and 1M items.

    .venv/bin/python benchmarks/bench_index.py                       # the committed table
    .venv/bin/python benchmarks/bench_index.py --sizes 10000 --queries 20 --out /tmp/x.md

Data: synthetic lexical vectors with realistic word statistics: V = 20,000 words used with Zipf-like frequencies
(P(word of rank r) ~ 1/r, the ranks shuffled over the vocabulary), each item with 300-1,100 distinct active words
(uniform), L2-normalised log-normal weights; queries with 20-60 active words drawn from the same word frequencies.
Generated in chunks of 10k items, so 1M items (~7e8 postings) never needs more than the CSR itself.

Exact answer: an independent reference, scipy float64 products over chunks of 100k items (so 1M items never needs a
float64 copy of the whole CSR). Recall@10 of every method, the inverted index included, is measured against it, with
ties: a hit counts when its exact score reaches the exact 10th best (within float32 rounding).
Latency is per query, single process: the index and Seismic query one at a time (Seismic with one thread); scipy and
dense score the whole batch of queries in one product, and their time is divided by the number of queries. Memory
is the bytes of each method's data structure (Seismic: the growth of the process's resident memory while it builds).
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
    alias_words = np.repeat(np.arange(len(p), dtype=np.int32), np.round(p * (1 << 20)).astype(np.int64))  # draw = 1 lookup
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
            cand_s, cand_r = np.vstack([best_s, sc]), np.vstack([best_r, np.arange(s, s + len(sc))[:, None].repeat(qd.shape[1], 1)])
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


def bench_size(n: int, nq: int, k: int, p: np.ndarray, dense_max_gb: float, seismic: bool, seed: int) -> list[dict]:
    rows = []
    t0 = time.perf_counter(); sv = items(n, p, seed); qs = queries(nq, p, seed + 1)
    gen_s = time.perf_counter() - t0
    print(f"[{n}] generated {sv.nnz:,} postings (mean {sv.mean_active():.0f} active) in {gen_s:.1f} s", file=sys.stderr)
    info = f"{sv.mean_active():.0f}"

    # --- the reference: exact float64 top-k by chunked scipy products (independent of every method below)
    t0 = time.perf_counter(); exact = Exact(sv, qs, k)
    print(f"[{n}] exact float64 reference in {time.perf_counter() - t0:.1f} s", file=sys.stderr)

    # --- the inverted index (exact: its recall is measured, not assumed)
    t0 = time.perf_counter(); idx = InvertedIndex.build(sv, [f"w{i}" for i in range(V)]); build = time.perf_counter() - t0
    got, lat = [], []
    for i in range(nq):
        t = time.perf_counter(); hits = idx.search(qs.row(i), k=k, explain=5); lat.append(time.perf_counter() - t)
        got.append([h.row for h in hits])
    t = time.perf_counter()
    for i in range(nq): idx.search(qs.row(i), k=k, explain=0)
    lat_noexp = (time.perf_counter() - t) / nq
    same = all(g == e[:len(g)].tolist() and len(g) == min(k, m) for g, e, m in zip(got, exact.rows, exact.n_match))
    rows.append(dict(n=n, method="lexvla.index (float32, explained)", build=build, mem=idx.nbytes,
                     lat=float(np.median(lat)), lat_note=f"mean {np.mean(lat) * 1e3:.0f} ms; without explanations {lat_noexp * 1e3:.0f} ms",
                     recall=recall(got, exact, k), exact_ids=same,
                     note="exact; " + ("the float64 reference's ids in its order" if same else "ids differ from the float64 order (ties)")))
    print(f"[{n}] index built in {build:.1f} s, {gb(idx.nbytes)}, {np.median(lat) * 1e3:.1f} ms/query", file=sys.stderr)
    del idx; gc.collect()

    # float16 postings: a third less memory; exact for the rounded weights, measured against the float32 answer
    t0 = time.perf_counter(); idx16 = InvertedIndex.build(sv, [f"w{i}" for i in range(V)], dtype="float16"); b16 = time.perf_counter() - t0
    got, lat = [], []
    for i in range(nq):
        t = time.perf_counter(); got.append([h.row for h in idx16.search(qs.row(i), k=k, explain=0)]); lat.append(time.perf_counter() - t)
    rows.append(dict(n=n, method="lexvla.index (float16 weights)", build=b16, mem=idx16.nbytes, lat=float(np.median(lat)),
                     lat_note="no explanations", recall=recall(got, exact, k), note="exact for the float16-rounded vectors"))
    del idx16; gc.collect()

    # --- scipy: one sparse x dense product for the whole batch
    csr = sv.to_scipy()
    qd = qs.to_dense().T  # (V, nq) float32
    t = time.perf_counter(); sc = csr @ qd; s_lat = (time.perf_counter() - t) / nq
    got = topk_rows(sc, k); del sc
    rows.append(dict(n=n, method="scipy CSR @ dense queries (float32)", build=0.0, mem=csr.data.nbytes + csr.indices.nbytes + csr.indptr.nbytes,
                     lat=s_lat, lat_note=f"batch of {nq} / {nq}", recall=recall(got, exact, k), note="brute force over every posting"))

    # --- dense brute force: the full (n, V) float32 matrix
    need = n * V * 4
    if need <= dense_max_gb * 1e9:
        dense = sv.to_dense()
        t = time.perf_counter(); sc = dense @ qd; d_lat = (time.perf_counter() - t) / nq
        got = topk_rows(sc, k); del sc, dense
        rows.append(dict(n=n, method="dense matmul (float32, BLAS)", build=0.0, mem=need, lat=d_lat,
                         lat_note=f"batch of {nq} / {nq}", recall=recall(got, exact, k), note=""))
    else:
        rows.append(dict(n=n, method="dense matmul (float32, BLAS)", build=None, mem=need, lat=None, lat_note="",
                         recall=None, note=f"skipped: the dense matrix needs {gb(need)} (> {dense_max_gb:g} GB cap)"))
    gc.collect()

    # --- Seismic (approximate; Rust): its dataset copies every posting, so check the memory first
    if seismic:
        need = sv.nnz * 12 + 2e9
        if mem_available() < need:
            rows.append(dict(n=n, method="pyseismic-lsr 0.5.4 (approximate)", build=None, mem=None, lat=None, lat_note="",
                             recall=None, note=f"skipped: needs ~{gb(need)} free, {gb(mem_available())} available"))
        else: rows.append(bench_seismic(sv, qs, k, exact, n))
    del sv, csr; gc.collect()
    return rows


def bench_seismic(sv: SparseVectors, qs: SparseVectors, k: int, exact: list, n: int) -> dict:
    try:
        import seismic as sm
        from seismic import SeismicDataset, SeismicIndex
    except ImportError as e:
        return dict(n=n, method="pyseismic-lsr", build=None, mem=None, lat=None, lat_note="", recall=None, note=f"not installed: {e}")
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
        index = SeismicIndex.build_from_dataset(ds, n_postings=SEISMIC["n_postings"], centroid_fraction=SEISMIC["centroid_fraction"],
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
        res = index.search(str(i), comps, qw.astype(np.float32), k, query_cut=len(qi), heap_factor=SEISMIC["heap_factor"])
        lat.append(time.perf_counter() - t)
        got.append([int(d) for _, _, d in res])
    del index; gc.collect()
    cfg = ", ".join(f"{a}={b}" for a, b in SEISMIC.items())
    return dict(n=n, method="pyseismic-lsr 0.5.4 (approximate)", build=build, mem=mem, lat=float(np.median(lat)),
                lat_note="1 query at a time", recall=recall(got, exact, k), note=f"{cfg}; memory = RSS growth")


# Seismic's defaults (n_postings=3500, centroid_fraction=0.1) took 190 s to build 10k items here: its summaries cost
# ~20 us per kept posting for items of ~700 words. Its pruning keeps about n_postings x V postings whatever the size.
SEISMIC = {"n_postings": 300, "centroid_fraction": 0.02, "summary_energy": 0.4, "heap_factor": 0.8}


def table(rows: list[dict], meta: dict) -> str:
    f = lambda v, fmt: "–" if v is None else fmt(v)
    out = [f"# Inverted index benchmark (`benchmarks/bench_index.py`)", "",
           *[f"- {k}: {v}" for k, v in meta.items()], "",
           "| items | method | build (s) | memory | query latency (median) | recall@10 vs exact | notes |",
           "|---:|---|---:|---:|---:|---:|---|"]
    for r in rows:
        lat = f((r["lat"]), lambda v: f"{v * 1e3:.1f} ms") + (f" ({r['lat_note']})" if r["lat_note"] and r["lat"] is not None else "")
        out.append(f"| {r['n']:,} | {r['method']} | {f(r['build'], lambda v: f'{v:.1f}')} | {f(r['mem'], gb)} | {lat} | "
                   f"{f(r['recall'], lambda v: f'{v:.3f}')} | {r['note']} |")
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    ap.add_argument("--queries", type=int, default=50, help="queries per size")
    ap.add_argument("-k", type=int, default=10)
    ap.add_argument("--dense-max-gb", type=float, default=4.0, help="skip dense brute force above this matrix size")
    ap.add_argument("--no-seismic", action="store_true")
    ap.add_argument("--seismic-max", type=int, default=1_000_000, help="largest size Seismic is run at")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "index.md"))
    ap.add_argument("--json", default=None, help="also write the rows as JSON here (the tests read it)")
    a = ap.parse_args(argv)
    p = zipf_p(V, 1.0, np.random.default_rng(12345).permutation(V))
    t0 = time.perf_counter()
    rows = []
    for n in a.sizes:
        rows += bench_size(n, a.queries, a.k, p, a.dense_max_gb, not a.no_seismic and n <= a.seismic_max, a.seed)
    meta = {"machine": f"{platform.machine()}, {os.cpu_count()} CPU cores (shared with other jobs while measured), "
                       f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB RAM; numpy {np.__version__}",
            "data": f"V = {V:,} words, Zipf-like word use (1/rank), 300-1,100 active words per item, "
                    f"{a.queries} queries of 20-60 words; k = {a.k}",
            "total wall time": f"{time.perf_counter() - t0:.0f} s",
            "peak resident memory": gb(int(open('/proc/self/status').read().split('VmHWM:')[1].split()[0]) * 1024)}
    md = table(rows, meta)
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
