"""Memory-lean patch -> vocabulary max-pool: `max_n (H Zᵀ)` without batch x patches x V (method §4).

Hand-written module (not generated from a notebook): it is dense autograd machinery (a custom
`torch.autograd.Function` with chunked forward and backward passes and a compiled CUDA path), which the
house style allows as plain code; it is tested against the obvious version in `tests/test_maxpool.py` and
measured by `benchmarks/bench_maxpool.py`.

Why (method §4, "Cost warning"): the image vector is `max over patches of H Z_imgᵀ`. Computed naively, the
(b, n, v) score tensor (256 patches x 17k-32k words per image) is materialised and kept for backward, and it
dominates memory and time. Here the forward pass walks the vocabulary in chunks, keeps only the (b, v) maxima
and their patch indices, and saves the inputs plus the (b, v) arg-max for backward (as int16/int32). The
backward pass routes each word's gradient to its winning patch only:

    dH[b, argmax[b, j]] += g[b, j] * Z[j]                   i.e. dH = S Z
    dZ[j]               += sum_b g[b, j] * H[b, argmax[b, j]]   i.e. dZ = Sᵀ H

with S the (b*n, v) routing matrix holding b*v non-zeros, so both are sparse x dense products with fp32
accumulation: exact (the max is piecewise linear), O(b*v*d) work instead of the naive O(b*n*v*d), and O(b*v)
extra memory. On the CPU two numba kernels compute them (each output row by one thread, its terms added in the
order of `torch.sparse.mm` on CSR, so the gradients are the same bits; 2.5-3.5x faster on 2 cores:
`benchmarks/bench_maxpool.py`); on a GPU `torch.sparse.mm` on CSR does. Where neither is available the
backward falls back to dense gather / batched GEMV / index_add over vocabulary chunks. Peak extra memory is
O(b*v + chunk) rather than O(b*n*v).

Ties: when several patches share a word's maximum, the whole gradient goes to the first of them (the index
`torch.max(dim=...)` and `torch.argmax` return); `Tensor.amax` instead splits it evenly among the tied
patches. On real-valued features ties have probability zero; both conventions are valid subgradients.
"""
from __future__ import annotations

from typing import Literal

import warnings

import numpy as np
import torch
from einops import einsum

try:  # the CPU backward's kernels (numba is a dependency: lexvla.index's scoring kernels use it too)
    import numba
    from numba import njit, prange
except ImportError:  # pragma: no cover - numba missing: the sparse CSR path serves the CPU too
    numba = None

__all__ = ["CHUNK_ELEMENTS", "MIN_CHUNK", "naive_lexical_maxpool", "lexical_maxpool", "chunk_sizes", "LexicalMaxPool"]

# Largest temporary a chunk may hold, in elements: b*n*c scores in the forward pass (b*c*d rows in the fallback
# backward). On CPU 2**22 elements (16 MiB fp32) measured fastest: the max-reduction then reads scores still in
# cache. The GPU takes larger chunks so its matmul units stay busy and kernel launches stay few.
# Chunks never go below MIN_CHUNK words, so a huge batch x patches keeps the matmul wide enough to be efficient.
CHUNK_ELEMENTS = {"cpu": 2**22, "cuda": 2**28}
MIN_CHUNK = 128
Backend = Literal["auto", "eager", "compile"]


def naive_lexical_maxpool(h: torch.Tensor,        # (b, n, d) patch features
                          codebook: torch.Tensor, # (v, d) visual codebook
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    "Reference: materialise the (b, n, v) scores, then `amax` and `argmax` over patches: (values, argmax), each (b, v)."
    scores = einsum(h, codebook, "b n d, v d -> b n v")
    return scores.amax(dim=1), scores.argmax(dim=1)


def chunk_sizes(b: int, n: int, d: int, v: int,  # batch, patches, width, vocabulary
                device: str | torch.device = "cpu",
                chunk_size: int | None = None,   # force one vocabulary chunk for both passes
               ) -> tuple[int, int]:
    "Vocabulary chunk lengths `(forward, backward)` whose temporaries stay within `CHUNK_ELEMENTS`."
    if chunk_size is not None:
        if int(chunk_size) < 1: raise ValueError(f"chunk_size: got {chunk_size}, expected a positive integer")
        c = min(int(chunk_size), v)
        return c, c
    budget = CHUNK_ELEMENTS["cuda" if torch.device(device).type == "cuda" else "cpu"]
    fwd = min(v, max(MIN_CHUNK, budget // max(1, b * n)))  # (b, n, c) scores
    bwd = min(v, max(MIN_CHUNK, budget // max(1, b * d)))  # (b, c, d) gathered rows (fallback backward only)
    return fwd, bwd


def _chunk_max_eager(hf: torch.Tensor, zc: torch.Tensor, b: int, n: int):
    "Max over patches of one vocabulary chunk: (b*n, d) x (c, d) -> values (b, c), first arg-max (b, c)."
    return torch.max((hf @ zc.T).view(b, n, zc.shape[0]), dim=1)


_COMPILED = {}


def _chunk_max_compiled():
    "`_chunk_max_eager` through torch.compile: on CUDA, Inductor emits the max / first arg-max as a Triton kernel."
    if "fn" not in _COMPILED:
        _COMPILED["fn"] = torch.compile(_chunk_max_eager, dynamic=True)
    return _COMPILED["fn"]


def _resolve_backend(backend: str, h: torch.Tensor) -> str:
    if backend not in ("auto", "eager", "compile"):
        raise ValueError(f"backend: got {backend!r}, expected 'auto', 'eager' or 'compile'")
    if backend != "auto": return backend
    if h.is_cuda:
        from torch.utils._triton import has_triton
        return "compile" if has_triton() else "eager"
    return "eager"


def _index_dtype(n: int) -> torch.dtype:
    "Smallest signed integer dtype holding a patch index (the saved arg-max is int16 for up to 32767 patches)."
    return torch.int16 if n <= torch.iinfo(torch.int16).max else torch.int32


def _sparse_csr(crow, col, val, size):
    "A CSR matrix without the beta-state and invariant-check warnings (the arrays are built sorted here)."
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, col, val, size=size, check_invariants=False)


def _grads_sparse(h, codebook, argmax, g, need_h, need_z, budget):
    "Backward as sparse x dense products with the (b*n, v) routing matrix S[b*n + argmax[b, j], j] = g[b, j]."
    b, n, d = h.shape
    v = codebook.shape[0]
    acc, dev = g.dtype, h.device
    idx = argmax.long()
    dh = dz = None
    # Both products run in blocks written into the preallocated result: the CSR x dense kernels allocate their
    # own output (and the CPU one a second copy), so whole-tensor calls would double the gradient's memory.
    if need_z:  # dZ = Sᵀ h: row j of Sᵀ holds one entry per sample, at increasing rows (already sorted)
        hf = h.reshape(b * n, d).to(acc)
        rows = (idx + torch.arange(b, device=dev).mul_(n).unsqueeze(1)).T.contiguous()  # (v, b)
        gt = g.T.contiguous()
        dz = torch.empty(v, d, dtype=acc, device=dev)
        c = max(1, budget // d)
        for s in range(0, v, c):
            e = min(v, s + c)
            st = _sparse_csr(torch.arange(0, (e - s) * b + 1, b, device=dev), rows[s:e].reshape(-1),
                             gt[s:e].reshape(-1), (e - s, b * n))
            dz[s:e] = torch.sparse.mm(st, hf)
    if need_h:  # dh = S Z: sort each sample's words by winning patch, giving S's rows in order (v entries per sample)
        zf = codebook.to(acc)
        patch, perm = idx.sort(dim=1, stable=True)  # (b, v)
        dh = torch.empty(b, n, d, dtype=acc, device=dev)
        c = max(1, budget // (n * d))
        for s in range(0, b, c):
            e = min(b, s + c)
            rows = patch[s:e] + torch.arange(e - s, device=dev).mul_(n).unsqueeze(1)  # (e-s, v), sorted row-major
            crow = torch.zeros((e - s) * n + 1, dtype=torch.long, device=dev)
            crow[1:] = torch.bincount(rows.reshape(-1), minlength=(e - s) * n).cumsum(0)
            sm = _sparse_csr(crow, perm[s:e].reshape(-1), g[s:e].gather(1, perm[s:e]).reshape(-1), ((e - s) * n, v))
            dh[s:e] = torch.sparse.mm(sm, zf).view(e - s, n, d)
    return dh, dz


def _grads_chunked(h, codebook, argmax, g, need_h, need_z, chunk):
    "Backward with dense ops only (gather, batched GEMV, index_add) over vocabulary chunks: the fallback path."
    b, n, d = h.shape
    v = codebook.shape[0]
    acc = g.dtype
    hf = h.reshape(b * n, d)
    dh = torch.zeros(b * n, d, dtype=acc, device=h.device) if need_h else None
    dz = torch.empty(v, d, dtype=acc, device=h.device) if need_z else None
    row0 = torch.arange(b, device=h.device).mul_(n).unsqueeze(1)  # (b, 1) first row of each sample in hf
    for s in range(0, v, chunk):
        rows = argmax[:, s:s + chunk].long() + row0  # (b, c)
        gc = g[:, s:s + chunk]
        if need_z:  # dZ[j] = sum_b g[b, j] h[b, argmax[b, j]]
            dz[s:s + chunk] = torch.bmm(gc.T.unsqueeze(1), hf[rows.T].to(acc)).squeeze(1)
        if need_h:  # dh[b, argmax[b, j]] += g[b, j] Z[j]
            contrib = gc.unsqueeze(-1) * codebook[s:s + chunk].unsqueeze(0).to(acc)  # (b, c, d)
            dh.index_add_(0, rows.reshape(-1), contrib.reshape(-1, d))
    return (dh.view(b, n, d) if need_h else None), dz


if numba is not None:
    @njit(cache=True, parallel=True, nogil=True)
    def _route_dz(hf, rows_t, g_t, dz):
        "dz[j] = sum_i g_t[j, i] hf[rows_t[j, i]], i ascending (the CSR row order of Sᵀ): one thread per word."
        v, b = g_t.shape
        d = hf.shape[1]
        for j in prange(v):
            for k in range(d): dz[j, k] = 0.0
            for i in range(b):
                w, r = g_t[j, i], rows_t[j, i]
                for k in range(d): dz[j, k] += w * hf[r, k]

    @njit(cache=True, parallel=True, nogil=True)
    def _route_dh(z, idx, g, dh, chunk):
        "dh[i, idx[i, j]] += g[i, j] z[j], j ascending (the CSR row order of S): one thread per sample."
        b, v = g.shape
        d = z.shape[1]
        for s in range(0, v, chunk):  # a block of codebook rows stays in cache while every sample reads it
            e = min(v, s + chunk)
            for i in prange(b):
                for j in range(s, e):
                    p, w = idx[i, j], g[i, j]
                    for k in range(d): dh[i, p, k] += w * z[j, k]


def _grads_numba(h, codebook, argmax, g, need_h, need_z):
    "The CPU backward: `_grads_sparse`'s sums, term for term, as two parallel numba loops (no CSR to build)."
    b, n, d = h.shape
    idx, acc = argmax.long(), g.dtype  # fp32 (fp64 for fp64 inputs)
    numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))
    dh = dz = None
    if need_z:
        hf = h.detach().reshape(b * n, d).to(acc).contiguous().numpy()
        rows_t = (idx + torch.arange(b).mul_(n).unsqueeze(1)).T.contiguous().numpy()
        dz = np.empty((codebook.shape[0], d), hf.dtype)
        _route_dz(hf, rows_t, g.T.contiguous().numpy(), dz)
        dz = torch.from_numpy(dz)
    if need_h:
        zf = codebook.detach().to(acc).contiguous().numpy()
        dh = np.zeros((b, n, d), zf.dtype)
        _route_dh(zf, idx.numpy(), g.contiguous().numpy(), dh, 256)
        dh = torch.from_numpy(dh)
    return dh, dz


_SPARSE_OK = {}  # device type -> False once torch.sparse.mm failed there
BACKWARDS = ("numba", "sparse", "chunked")  # the CPU's choices, fastest first (`LexicalMaxPool.cpu_backward`)


class LexicalMaxPool(torch.autograd.Function):
    "Chunked `max_n (h @ codebookᵀ)` that saves only the inputs and the (b, v) arg-max; see the module docstring."
    cpu_backward = "numba" if numba is not None else "sparse"  # the CPU's backward; a GPU takes sparse (or chunked)

    @staticmethod
    def forward(ctx, h, codebook, chunk_size, backend):
        b, n, d = h.shape
        v = codebook.shape[0]
        fwd_chunk, bwd_chunk = chunk_sizes(b, n, d, v, h.device, chunk_size)
        step = _chunk_max_compiled() if backend == "compile" else _chunk_max_eager
        hf = h.reshape(b * n, d)
        values = h.new_empty(b, v)
        argmax = torch.empty(b, v, dtype=torch.long, device=h.device)
        for s in range(0, v, fwd_chunk):
            vals, idx = step(hf, codebook[s:s + fwd_chunk], b, n)
            values[:, s:s + fwd_chunk] = vals
            argmax[:, s:s + fwd_chunk] = idx
        ctx.bwd_chunk = bwd_chunk
        ctx.budget = CHUNK_ELEMENTS["cuda" if h.is_cuda else "cpu"]
        ctx.save_for_backward(h, codebook, argmax.to(_index_dtype(n)))
        ctx.mark_non_differentiable(argmax)
        return values, argmax

    @staticmethod
    def backward(ctx, grad_values, _grad_argmax):
        h, codebook, argmax = ctx.saved_tensors
        need_h, need_z = ctx.needs_input_grad[:2]
        # Each dh row sums ~v/n word contributions: accumulate in fp32 (fp64 for fp64) whatever the input dtype.
        g = grad_values.to(torch.float64 if h.dtype == torch.float64 else torch.float32)
        dev = h.device.type
        path = LexicalMaxPool.cpu_backward if dev == "cpu" else "sparse"
        if path == "sparse" and not _SPARSE_OK.get(dev, True): path = "chunked"
        if path == "numba":
            dh, dz = _grads_numba(h, codebook, argmax, g, need_h, need_z)
        elif path == "sparse":
            try:
                dh, dz = _grads_sparse(h, codebook, argmax, g, need_h, need_z, ctx.budget)
            except (RuntimeError, NotImplementedError) as e:  # a device or build without sparse CSR x dense
                warnings.warn(f"lexical_maxpool: sparse backward unavailable on {dev} ({e}); using the chunked one")
                _SPARSE_OK[dev], path = False, "chunked"
        if path == "chunked":
            dh, dz = _grads_chunked(h, codebook, argmax, g, need_h, need_z, ctx.bwd_chunk)
        return (dh.to(h.dtype) if need_h else None), (dz.to(codebook.dtype) if need_z else None), None, None


def lexical_maxpool(h: torch.Tensor,                  # (b, n, d) patch features
                    codebook: torch.Tensor,           # (v, d) visual codebook
                    chunk_size: int | None = None,    # vocabulary words per chunk (default: from `CHUNK_ELEMENTS`)
                    backend: Backend = "auto",        # "compile" (torch.compile; auto on CUDA) or "eager"
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    "Memory-lean `max over patches of h @ codebookᵀ`: (values (b, v), argmax (b, v) long), the naive gradients."
    if h.ndim != 3: raise ValueError(f"h: got shape {tuple(h.shape)}, expected (batch, patches, width)")
    if codebook.ndim != 2: raise ValueError(f"codebook: got shape {tuple(codebook.shape)}, expected (vocab, width)")
    if h.shape[-1] != codebook.shape[-1]:
        raise ValueError(f"widths differ: h has {h.shape[-1]}, codebook has {codebook.shape[-1]}")
    if h.shape[1] == 0: raise ValueError("h: no patches to max-pool over (n == 0)")
    if h.device != codebook.device: raise ValueError(f"h is on {h.device}, codebook on {codebook.device}")
    backend = _resolve_backend(backend, h)
    dev = h.device.type
    # Same dtype rules as the naive einsum: autocast's dtype when autocast is on, else the promoted type.
    # The casts happen outside the Function, so autograd returns gradients in each input's own dtype.
    if torch.is_autocast_enabled(dev): dtype = torch.get_autocast_dtype(dev)
    else: dtype = torch.promote_types(h.dtype, codebook.dtype)
    if not dtype.is_floating_point:
        raise ValueError(f"h and codebook must be floating point, got {h.dtype} and {codebook.dtype}")
    h, codebook = h.to(dtype).contiguous(), codebook.to(dtype).contiguous()
    with torch.autocast(dev, enabled=False):
        return LexicalMaxPool.apply(h, codebook, chunk_size, backend)
