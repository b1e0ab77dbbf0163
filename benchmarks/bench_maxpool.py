"""Benchmark: the memory-lean patch -> vocabulary max-pool (`lexvla.maxpool.lexical_maxpool`) against the naive
`einsum('bnd,vd->bnv').amax(1)`, forward (training mode, graph kept) and forward+backward (method §4).

    python benchmarks/bench_maxpool.py                       # CPU (and CUDA when present): prints a markdown table
    python benchmarks/bench_maxpool.py --out benchmarks/results/maxpool.md

CPU: every (case, implementation, pass) runs in a fresh subprocess; peak memory is the growth of the process's
peak resident set (VmHWM, reset through /proc/self/clear_refs once the inputs exist and the code path has run once
on a tiny problem, so first-call costs such as loading numba's kernels are not counted; `ru_maxrss` where that is
not allowed) to the end of the timed runs, with glibc's mmap threshold fixed so freed tensors leave the RSS (so it
counts the scores, what autograd saves, the backward temporaries and the gradients). Time is the best of the timed
runs after one warm-up.
Cases whose naive version would need more than `--ram-limit-gb` are reported as OOM-skipped with the analytic
need; cases too slow for a CPU run are reported as time-skipped with their TFLOP.
CUDA: the same cases in bf16 in one process, memory from `torch.cuda.max_memory_allocated`, time from CUDA
events, plus the fraction of the bf16 matmul peak, measured in the same run as a plain (b*n, d) x (d, v) matmul.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass

# (name, b, n, v, d): embedded shapes (SmolLM2 width 576, V ~ 20k) and paper shapes (Llama-2 width 4096, V 17k-32k)
CASES = [
    ("embedded, 16 patches", 32, 16, 20000, 576),
    ("embedded, 64 patches", 64, 64, 20000, 576),
    ("embedded width, 256 patches", 32, 256, 20000, 576),
    ("paper, batch 8", 8, 256, 17149, 4096),
    ("paper, batch 256, V 17k", 256, 256, 17149, 4096),
    ("paper, batch 256, V 32k", 256, 256, 32000, 4096),
]
# a toy case for the tests: seconds, yet the naive (b, n, V) scores (82 MB) outgrow one fused chunk (16 MB)
TOY_CASES = [("toy", 16, 64, 20000, 64)]
CPU_MAX_TFLOP = 0.5  # a forward pass over this many TFLOP is too slow for the CPU run (~100 GFLOP/s fp32)


@dataclass
class Case:
    name: str
    b: int
    n: int
    v: int
    d: int
    dtype: str = "float32"

    @property
    def esize(self): return 2 if self.dtype == "bfloat16" else 4

    @property
    def tflop(self): return 2 * self.b * self.n * self.v * self.d / 1e12

    def naive_need(self, mode):
        "Analytic lower bound of the naive head's extra bytes: the (b, n, v) scores, plus in backward the amax mask and dense gradient."
        bnv = self.b * self.n * self.v
        return bnv * self.esize if mode == "fwd" else bnv * (2 * self.esize + 1) + self.grads()

    def fused_need(self, mode, chunk):
        "Analytic estimate of the fused head's extra bytes: (b, v) values, indices and one chunk of scores (+ sparse backward)."
        bv = self.b * self.v
        fwd = bv * (self.esize + 8 + 2) + self.b * self.n * chunk * self.esize
        return fwd if mode == "fwd" else fwd + bv * 40 + self.grads()

    def grads(self):  # dh (b, n, d) and dZ (v, d), plus their fp32 accumulators
        return (self.b * self.n * self.d + self.v * self.d) * (self.esize + 4)


def gb(x): return f"{x / 2**30:.2f} GB" if x >= 2**30 else f"{x / 2**20:.0f} MB"


# ---------------------------------------------------------------- worker: one measurement in a fresh process
def _reset_peak() -> bool:
    "Reset the kernel's resident-set high-water mark to the current RSS (Linux >= 4.0); False where not allowed."
    try:
        with open("/proc/self/clear_refs", "w") as fh: fh.write("5")
        return True
    except OSError:
        return False


def _peak_bytes() -> int:
    "The process's peak resident set: VmHWM (resettable), else ru_maxrss."
    try:
        return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM"))
    except (OSError, StopIteration):
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def worker(spec: dict) -> dict:
    import torch
    from lexvla.maxpool import lexical_maxpool
    torch.manual_seed(0)
    dtype = getattr(torch, spec["dtype"])
    b, n, v, d = spec["b"], spec["n"], spec["v"], spec["d"]
    h = torch.empty(b, n, d, dtype=dtype).normal_().requires_grad_()  # in place: no temporaries to raise the peak
    z = torch.empty(v, d, dtype=dtype).normal_(std=d ** -0.5).requires_grad_()
    if spec["impl"] == "naive":
        def f(h, z): return torch.einsum("bnd,vd->bnv", h, z).amax(1)
    else:
        def f(h, z): return lexical_maxpool(h, z)[0]
    # The code path once on a tiny problem first: numba's backward kernels load (or compile) on their first call,
    # ~70 MB of LLVM that is no part of a training step's memory and would otherwise sit in the fused peak.
    hw, zw = (torch.ones(2, 4, d, dtype=dtype, requires_grad=True), torch.ones(8, d, dtype=dtype, requires_grad=True))
    f(hw, zw).sum().backward()
    del hw, zw
    _reset_peak()
    base = _peak_bytes()
    times = []
    for i in range(1 + spec["reps"]):
        if i == 1 and times[0] > spec["slow_s"]: break  # a slow case: the warm-up run is the measurement
        t = time.perf_counter()
        out = f(h, z)
        if spec["mode"] == "fwdbwd":
            out.sum().backward()
            h.grad = z.grad = None
        times.append(time.perf_counter() - t)
        del out
    return {"peak": _peak_bytes() - base, "time": min(times[1:] or times)}


def run_cpu_case(case: Case, impl: str, mode: str, reps: int, slow_s: float) -> dict:
    spec = dict(b=case.b, n=case.n, v=case.v, d=case.d, dtype=case.dtype, impl=impl, mode=mode, reps=reps, slow_s=slow_s)
    # A fixed glibc mmap threshold (its default start value) stops glibc from raising it after the first large
    # free and then keeping freed chunks on the heap: RSS then follows the live tensors, for both heads alike.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    r = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True, env=env)
    if r.returncode != 0: raise RuntimeError(f"worker {spec} failed:\n{r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- CUDA: one process, CUDA events
def run_cuda(cases, reps=5):
    import torch
    from lexvla.maxpool import lexical_maxpool
    dev, dtype = "cuda", torch.bfloat16

    def timed(f):
        for _ in range(2): f()
        torch.cuda.synchronize()
        ts = []
        for _ in range(reps):
            a, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record(); f(); e.record(); torch.cuda.synchronize()
            ts.append(a.elapsed_time(e) / 1e3)
        return sorted(ts)[len(ts) // 2]

    rows = []
    free = torch.cuda.mem_get_info()[0]
    for c in cases:
        c = Case(*c, dtype="bfloat16")
        h = torch.randn(c.b, c.n, c.d, device=dev, dtype=dtype).requires_grad_()
        z = (torch.randn(c.v, c.d, device=dev, dtype=dtype) / c.d ** 0.5).requires_grad_()
        hf = h.detach().reshape(-1, c.d)
        t_mm = timed(lambda: hf @ z.detach().T)  # the bf16 matmul peak for this very shape
        row = {"case": c, "mm_tflops": c.tflop / t_mm}
        for mode in ("fwd", "fwdbwd"):
            for impl in ("naive", "fused"):
                if impl == "naive" and c.naive_need(mode) > 0.8 * free:
                    row[impl, mode] = {"skip": f"OOM-skipped (needs {gb(c.naive_need(mode))})"}
                    continue
                def f():
                    out = torch.einsum("bnd,vd->bnv", h, z).amax(1) if impl == "naive" else lexical_maxpool(h, z)[0]
                    if mode == "fwdbwd":
                        out.sum().backward()
                        h.grad = z.grad = None
                torch.cuda.synchronize(); torch.cuda.empty_cache()
                base = torch.cuda.memory_allocated(); torch.cuda.reset_peak_memory_stats()
                t = timed(f)
                row[impl, mode] = {"peak": torch.cuda.max_memory_allocated() - base, "time": t}
        rows.append(row)
        del h, z, hf
    return rows


# ---------------------------------------------------------------- tables
def _cell_pair(row, mode):
    nv, fu = row.get(("naive", mode), {}), row.get(("fused", mode), {})
    def mem(r): return r["skip"] if "skip" in r else gb(r["peak"]) if "peak" in r else "-"
    def tm(r): return f"{r['time']:.3f} s" if "time" in r else "-"
    both = "peak" in nv and "peak" in fu
    ratio_m = f"{nv['peak'] / max(fu['peak'], 1):.1f}x" if both else "-"
    ratio_t = f"{fu['time'] / nv['time']:.2f}x" if both else "-"
    return [mem(nv), mem(fu), ratio_m, tm(nv), tm(fu), ratio_t]


COLUMNS = ["case", "b", "n", "V", "d", "dtype", "pass", "naive peak", "fused peak", "memory naive/fused",
           "naive time", "fused time", "time fused/naive", "of each peak: dh + dZ"]


def table(rows, extra=None):
    cols = COLUMNS + list(extra or [])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in rows:
        c = row["case"]
        for mode, label in (("fwd", "forward"), ("fwdbwd", "forward+backward")):
            grads = gb((c.b * c.n * c.d + c.v * c.d) * c.esize) if mode == "fwdbwd" else "-"
            cells = [c.name, c.b, c.n, c.v, c.d, c.dtype, label, *_cell_pair(row, mode), grads]
            if extra: cells += row.get("extra", {}).get(mode, ["-"] * len(extra))
            lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="cuda also runs the CPU table unless --device cuda")
    ap.add_argument("--ram-limit-gb", type=float, default=12.0, help="CPU: skip naive runs that would need more")
    ap.add_argument("--reps", type=int, default=3, help="timed runs after one warm-up (fewer for slow cases)")
    ap.add_argument("--slow-s", type=float, default=3.0, help="a warm-up slower than this is the only run")
    ap.add_argument("--out", help="also write the markdown report here")
    ap.add_argument("--cases", choices=["all", "toy"], default="all", help="toy: one small case (the tests run it)")
    ap.add_argument("--passes", nargs="+", choices=["fwd", "fwdbwd"], default=["fwd", "fwdbwd"], help="CPU passes run")
    ap.add_argument("--json", help="also write the measured CPU rows as JSON here (the tests read it)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        print(json.dumps(worker(json.loads(a.worker))))
        return
    import torch
    from lexvla.maxpool import chunk_sizes
    t_start = time.perf_counter()
    parts = []
    cuda = torch.cuda.is_available() and a.device in ("auto", "cuda")
    if a.device != "cuda":
        rows = []
        for name, b, n, v, d in (TOY_CASES if a.cases == "toy" else CASES):
            c = Case(name, b, n, v, d)
            row = {"case": c}
            chunk = chunk_sizes(b, n, d, v)[0]
            for mode in a.passes:
                if c.tflop > CPU_MAX_TFLOP:
                    need = c.naive_need(mode)
                    row["naive", mode] = {"skip": (f"OOM-skipped (needs ≥ {gb(need)})" if need > a.ram_limit_gb * 2**30
                                                   else f"time-skipped ({c.tflop:.1f} TFLOP; needs ≥ {gb(need)})")}
                    row["fused", mode] = {"skip": f"time-skipped (≈ {gb(c.fused_need(mode, chunk))} estimated)"}
                    continue
                for impl in ("naive", "fused"):
                    if impl == "naive" and c.naive_need(mode) > a.ram_limit_gb * 2**30:
                        row[impl, mode] = {"skip": f"OOM-skipped (needs ≥ {gb(c.naive_need(mode))})"}
                        continue
                    row[impl, mode] = run_cpu_case(c, impl, mode, a.reps, a.slow_s)
                    print(f"  {name} {mode} {impl}: {row[impl, mode]}", file=sys.stderr, flush=True)
            rows.append(row)
        cpu = platform.processor() or platform.machine()
        try:
            cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
        except (OSError, StopIteration): pass
        parts.append(f"## CPU ({cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}, fp32)\n\n{table(rows)}")
        if a.json:
            with open(a.json, "w") as fh:
                json.dump([{"case": r["case"].name, **{f"{k[0]}_{k[1]}": v for k, v in r.items() if k != "case"}}
                           for r in rows], fh, indent=1)
    if cuda:
        rows = run_cuda([(n_, b, n, v, d) for n_, b, n, v, d in CASES])
        for r in rows:
            fu = r.get(("fused", "fwd"), {})
            frac = f"{r['case'].tflop / fu['time'] / r['mm_tflops']:.2f}" if "time" in fu else "-"
            r["extra"] = {"fwd": [f"{r['mm_tflops']:.0f}", frac], "fwdbwd": ["", ""]}
        parts.append(f"## CUDA ({torch.cuda.get_device_name()}, bf16)\n\nplain matmul = the same (b*n, d) x (d, v) "
                     f"product alone, measured in this run; fraction = fused forward throughput / that matmul's.\n\n"
                     + table(rows, extra=["plain bf16 matmul TFLOP/s", "fused fwd fraction of it"]))
    body = "\n\n".join(parts)
    print(body)
    if a.out:
        took = time.perf_counter() - t_start
        head = (f"# Benchmark: memory-lean patch -> vocabulary max-pool\n\n"
                f"`python benchmarks/bench_maxpool.py --out {a.out}` ({datetime.date.today()}, {took:.0f} s, "
                f"{os.cpu_count()} CPUs). Naive = `einsum('bnd,vd->bnv').amax(1)` (values only, its cheapest form); "
                f"fused = `lexvla.maxpool.lexical_maxpool` (default chunking). Forward runs in training mode (the graph "
                f"and what it saves are alive at the peak). Peak = growth of the process's peak RSS over the inputs, "
                f"each measurement in a fresh process after one untimed run of its code path on a tiny problem (so "
                f"loading numba's kernels is not counted); time = best of the timed runs after a warm-up "
                f"(slow cases: one run). Skipped rows give the analytic memory need. Both forward+backward peaks include "
                f"the gradients dh (b, n, d) and dZ (v, d) themselves (last column), which no max-pool can avoid.\n\n"
                f"**Note:** these numbers were taken on a shared 2-core machine with other jobs running, so times are "
                f"noisy (memory is not); the lead re-runs this script on a quiet machine before quoting times.\n\n")
        tmp = a.out + ".tmp"
        with open(tmp, "w") as fh: fh.write(head + body + "\n")
        os.replace(tmp, a.out)


if __name__ == "__main__":
    main()
