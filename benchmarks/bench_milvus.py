"""Benchmark: lexical-vector search in milvus-lite (`lexvla.milvus.MilvusIndex`, the embedded Milvus engine) next to
the in-process exact inverted index (`lexvla.index.InvertedIndex`), at 10k and 100k items.

    python benchmarks/bench_milvus.py                                   # prints a markdown table
    python benchmarks/bench_milvus.py --out benchmarks/results/milvus.md

Items are synthetic lexical vectors shaped like LexVLA's (`lexvla.milvus.random_lexical`: V = 20,000 words, about
300-1,100 active per item, Zipf-like word use, positive weights, L2-normalised); queries are drawn the same way (the
paper's vectors keep ~1,081 active words at the 1/sqrt(V) threshold, method §5). Each size runs in a fresh subprocess:

- ingest: items/s of `MilvusIndex.ingest` (batched upserts and the final flush) and of `InvertedIndex.build`;
- memory: resident set of the milvus-lite engine process (it runs as a child process) after ingest and queries,
  the on-disk size of its data, and the growth of the Python process's resident set during `InvertedIndex.build`;
- latency: one query per call (median and 95th percentile), top-10 with a 5-word explanation per hit (for Milvus
  this returns the stored vectors with the hits), and for Milvus also without explanations (the engine alone);
- recall@10 of each engine's top-10 against the exact top-10 (brute-force inner products with scipy).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

V = 20000
K = 10


def _rss_mb(pid: int) -> float:
    import psutil
    return psutil.Process(pid).memory_info().rss / 2**20


def _lite_pids() -> list[int]:
    "Children of this process that are milvus-lite engines."
    import psutil
    out = []
    for c in psutil.Process().children(recursive=True):
        try:
            if any("milvus_lite" in a for a in c.cmdline()): out.append(c.pid)
        except psutil.Error:
            pass
    return out


def _dir_mb(p: Path) -> float:
    if p.is_file(): return p.stat().st_size / 2**20
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) / 2**20


def _pct(xs, q): 
    import numpy as np
    return float(np.percentile(np.asarray(xs) * 1000, q))


def run_size(n: int, n_queries: int, seed: int) -> list[dict]:
    "Both engines at `n` items (run inside a fresh subprocess)."
    import numpy as np
    import scipy.sparse as sps
    from lexvla.index import InvertedIndex
    from lexvla.milvus import MilvusIndex, random_lexical

    words = [f"w{j}" for j in range(V)]
    docs = random_lexical(n, V, seed=seed)
    queries = random_lexical(n_queries, V, seed=seed + 1, ids=[f"q{i}" for i in range(n_queries)])
    csr = lambda s: sps.csr_matrix((s.data, s.indices, s.indptr), shape=(len(s), s.dim))
    from lexvla.index import topk_agrees
    S = (csr(queries).astype(np.float64) @ csr(docs).astype(np.float64).T).toarray()  # exact, float64
    pos = {d: j for j, d in enumerate(docs.ids)}
    active = float(np.diff(docs.indptr).mean())

    def recall(hits) -> float:
        "Recall@K with ties: a hit counts when its exact score reaches the exact K-th best (float32 rounding allowed)."
        out = []
        for s, hs in zip(S, hits):
            n_pos = int((s > 0).sum())  # items sharing no word are never hits
            if n_pos == 0: out.append(float(not hs)); continue
            kth = np.sort(s[s > 0])[::-1][min(K, n_pos) - 1]
            got = {pos[h.id] for h in hs[:K]}
            out.append(sum(s[j] >= kth - 1e-5 * s.max() for j in got) / min(K, n_pos))
        return float(np.mean(out))

    def exact_share(hits) -> float:
        "Share of queries whose answer is a correct top-K (ids, ties in any order, and each hit's own score)."
        return float(np.mean([topk_agrees(hs, s, docs.ids, K) for s, hs in zip(S, hits)]))
    qrows = [queries.row(i) for i in range(n_queries)]
    rows = []

    # the in-process exact inverted index
    before = _rss_mb(os.getpid())
    t = time.perf_counter(); inv = InvertedIndex.build(docs, words); build = time.perf_counter() - t
    grown = _rss_mb(os.getpid()) - before
    inv.search(qrows[0], K)  # warm-up
    lat, hits = [], []
    for q in qrows:
        t = time.perf_counter(); hits.append(inv.search(q, K)); lat.append(time.perf_counter() - t)
    rows.append(dict(engine="in-process InvertedIndex", n=n, active=active, ingest=n / build,
                     memory=f"{grown:.0f} (process growth)", p50=_pct(lat, 50), p95=_pct(lat, 95),
                     p50_engine=None, recall=recall(hits), exact=exact_share(hits)))
    del inv, hits

    # milvus-lite: a fresh data file, batched ingest, then the same queries
    with tempfile.TemporaryDirectory() as d:
        uri = Path(d) / "bench.db"
        idx = MilvusIndex(words, uri=uri, collection="bench")
        t = time.perf_counter(); idx.ingest(docs, batch_size=1000, progress=True); ingest = time.perf_counter() - t
        assert idx.count() == n
        idx.search(qrows[0], k=K)  # warm-up (the engine loads its index)
        lat, hits = [], []
        for q in qrows:
            t = time.perf_counter(); hits.append(idx.search(q, k=K, explain=5)); lat.append(time.perf_counter() - t)
        lat0 = []
        for q in qrows:
            t = time.perf_counter(); idx.search(q, k=K, explain=0); lat0.append(time.perf_counter() - t)
        engine = sum(_rss_mb(p) for p in _lite_pids())
        disk = _dir_mb(uri)
        rows.append(dict(engine="milvus-lite (MilvusIndex)", n=n, active=active, ingest=n / ingest,
                         memory=f"{engine:.0f} (engine process), {disk:.0f} on disk", p50=_pct(lat, 50),
                         p95=_pct(lat, 95), p50_engine=_pct(lat0, 50), recall=recall(hits), exact=exact_share(hits)))
        idx.close()
    return rows


def table(rows: list[dict]) -> str:
    out = ["| engine | items | active words (mean) | ingest (items/s) | memory (MiB) | query p50 / p95 (ms) "
           "| engine only p50 (ms) | recall@10 | exact top-10 |", "|---|---:|---:|---:|---|---:|---:|---:|---:|"]
    for r in rows:
        eng = "-" if r["p50_engine"] is None else f"{r['p50_engine']:.1f}"
        out.append(f"| {r['engine']} | {r['n']:,} | {r['active']:.0f} | {r['ingest']:,.0f} | {r['memory']} "
                   f"| {r['p50']:.1f} / {r['p95']:.1f} | {eng} | {r['recall']:.3f} | {r['exact']:.0%} of queries |")
    return "\n".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10000, 100000], help="collection sizes (items)")
    ap.add_argument("--queries", type=int, default=100, help="queries per size")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="write the markdown here (atomically)")
    ap.add_argument("--json", type=Path, default=None, help="also write the rows as JSON here (the tests read it)")
    ap.add_argument("--_one", type=int, default=None, help=argparse.SUPPRESS)  # internal: run one size, print JSON
    a = ap.parse_args(argv)
    if a._one is not None:
        print("ROWS " + json.dumps(run_size(a._one, a.queries, a.seed)))
        return
    rows, t0 = [], time.perf_counter()
    for n in a.sizes:
        r = subprocess.run([sys.executable, __file__, "--_one", str(n), "--queries", str(a.queries), "--seed", str(a.seed)],
                           stdout=subprocess.PIPE, text=True, check=True)
        rows += json.loads(next(l for l in r.stdout.splitlines() if l.startswith("ROWS "))[5:])
    from importlib.metadata import version
    md = (f"# Lexical search: milvus-lite next to the in-process index\n\n"
          f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}; "
          f"pymilvus {version('pymilvus')}, milvus-lite {version('milvus-lite')}. Run {datetime.date.today()} "
          f"in {time.perf_counter() - t0:.0f} s by `python benchmarks/bench_milvus.py`.\n\n"
          f"Synthetic LexVLA-shaped vectors (`lexvla.milvus.random_lexical`): V = {V:,} words, Zipf-like word use, "
          f"L2-normalised; {a.queries} queries drawn the same way; top-{K}, one query per call. Recall is against "
          f"the exact top-{K} (brute-force float64 inner products, scipy; ties at the {K}th score count either way); "
          f"exact top-{K} is the share of queries answered with the right ids and scores. Query times include the "
          f"Python client and, "
          f"except in the engine-only column, a 5-word explanation per hit from the stored vectors.\n\n"
          + table(rows) + "\n")
    print(md)
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = a.out.with_name(a.out.name + ".tmp"); tmp.write_text(md); os.replace(tmp, a.out)
    if a.json: a.json.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
