"""The memory-lean patch -> vocabulary max-pool (lexvla/maxpool.py) against the naive einsum + amax (method §4)."""
import pytest
import torch

import lexvla.maxpool as M
from lexvla.maxpool import chunk_sizes, lexical_maxpool, naive_lexical_maxpool

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _inputs(b, n, d, v, dtype=torch.float32, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(b, n, d, generator=g, dtype=torch.float64).to(device=device, dtype=dtype).requires_grad_()
    z = (torch.randn(v, d, generator=g, dtype=torch.float64) / d ** 0.5).to(device=device, dtype=dtype).requires_grad_()
    w = torch.randn(b, v, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)  # upstream gradient
    return h, z, w


def _run(fn, h, z, w, **kw):
    "values, argmax, dh, dz of fn under the upstream gradient w."
    h.grad = z.grad = None
    values, argmax = fn(h, z, **kw)
    (values * w).sum().backward()
    out = values.detach(), argmax, h.grad.clone(), z.grad.clone()
    h.grad = z.grad = None
    return out


def _no_near_ties(h, z, gap):
    "True where the best patch beats the runner-up by more than `gap` (so any rounding keeps the same arg-max)."
    top2 = torch.einsum("bnd,vd->bnv", h.detach().double(), z.detach().double()).topk(2, dim=1).values
    return (top2[:, 0] - top2[:, 1]) > gap


def _reference_grads(h, z, w, argmax):
    "The naive gradients in fp32 through the same (possibly bf16-rounded) inputs and the same winning patches."
    h32, z32 = h.detach().float().requires_grad_(), z.detach().float().requires_grad_()
    s = torch.einsum("bnd,vd->bnv", h32, z32).gather(1, argmax.unsqueeze(1)).squeeze(1)
    (s * w.float()).sum().backward()
    return h32.grad, z32.grad


@pytest.fixture(params=list(M.BACKWARDS))
def backward_path(request, monkeypatch):
    "Run each gradient test through every CPU backward implementation (numba, sparse CSR, chunked)."
    monkeypatch.setattr(M.LexicalMaxPool, "cpu_backward", request.param)
    monkeypatch.setitem(M._SPARSE_OK, "cpu", True)
    return request.param


@pytest.mark.parametrize("chunk_size", [1, 3, None])
def test_gradcheck_float64(chunk_size, backward_path):
    h, z, _ = _inputs(2, 5, 4, 7, dtype=torch.float64, seed=1)
    assert torch.autograd.gradcheck(lambda h, z: lexical_maxpool(h, z, chunk_size)[0], (h, z))


@pytest.mark.parametrize("shape", [(3, 17, 8, 50), (2, 1, 5, 9), (4, 64, 16, 300)], ids=str)
@pytest.mark.parametrize("chunk_size", [1, 7, 64, 1000, None])
def test_equals_naive_float32(shape, chunk_size, backward_path):
    b, n, d, v = shape
    h, z, w = _inputs(b, n, d, v, seed=sum(shape) + (chunk_size or 0))
    fv, fa, fdh, fdz = _run(lexical_maxpool, h, z, w, chunk_size=chunk_size)
    nv, na, ndh, ndz = _run(naive_lexical_maxpool, h, z, w)
    assert fa.dtype == torch.long and fa.shape == (b, v) and not fa.requires_grad
    torch.testing.assert_close(fv, nv, rtol=1e-5, atol=1e-5)
    assert (fa == na).all()  # random floats: no ties within 1e-5
    torch.testing.assert_close(fdh, ndh, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fdz, ndz, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("chunk_size", [16, None])
def test_bfloat16_matches_naive(chunk_size, backward_path):
    "bf16 inputs: values and arg-max as the naive bf16 einsum; gradients within bf16 rounding of the fp32 ones."
    h, z, w = _inputs(3, 32, 64, 200, dtype=torch.bfloat16, seed=5)
    fv, fa, fdh, fdz = _run(lexical_maxpool, h, z, w, chunk_size=chunk_size)
    nv, na, _, _ = _run(naive_lexical_maxpool, h, z, w)
    assert fv.dtype == fdh.dtype == fdz.dtype == torch.bfloat16
    torch.testing.assert_close(fv, nv, rtol=1e-2, atol=1e-2)
    safe = _no_near_ties(h, z, 0.05)
    assert safe.float().mean() > 0.5 and (fa == na)[safe].all()
    rdh, rdz = _reference_grads(h, z, w, fa)
    torch.testing.assert_close(fdh.float(), rdh, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(fdz.float(), rdz, rtol=2e-2, atol=2e-2)


def test_ties_go_to_the_first_patch(backward_path):
    "Identical patches tie on every word: the fused head gives the first one all the gradient (like torch.max), amax splits it."
    h0, z, w = _inputs(2, 3, 4, 6, dtype=torch.float64, seed=3)
    h = h0.detach().clone()
    h[:, 2] = h[:, 0]  # patch 2 duplicates patch 0
    h.requires_grad_()
    fv, fa, fdh, fdz = _run(lexical_maxpool, h, z, w)
    mv, ma = torch.einsum("bnd,vd->bnv", h, z).max(dim=1)  # torch.max(dim): first index, all the gradient to it
    (mv * w).sum().backward()
    torch.testing.assert_close(fdh, h.grad); h.grad = None
    assert (fa == ma).all() and not (fa == 2).any()
    nv, na, ndh, ndz = _run(naive_lexical_maxpool, h, z, w)
    assert (fa == na).all()  # argmax also takes the first index
    torch.testing.assert_close(fv, nv)
    torch.testing.assert_close(fdz, ndz)  # the tied rows are equal, so dZ does not depend on the split
    won0 = (fa == 0)  # words won by the duplicated pair: naive halves them between patches 0 and 2
    assert won0.any()
    torch.testing.assert_close(ndh[:, 0] + ndh[:, 2], fdh[:, 0] + fdh[:, 2])
    torch.testing.assert_close(ndh[:, 0], ndh[:, 2])
    assert not torch.allclose(fdh[:, 0], ndh[:, 0])


def test_one_side_frozen(backward_path):
    "A frozen codebook (or frozen features) gets no gradient; the other side's is unchanged."
    h, z, w = _inputs(2, 9, 6, 40, seed=7)
    _, _, ndh, ndz = _run(naive_lexical_maxpool, h, z, w)
    zf = z.detach()
    v, _ = lexical_maxpool(h, zf, chunk_size=8)
    (v * w).sum().backward()
    torch.testing.assert_close(h.grad, ndh, rtol=1e-5, atol=1e-5)
    hf = h.detach()
    v, _ = lexical_maxpool(hf, z, chunk_size=8)
    (v * w).sum().backward()
    torch.testing.assert_close(z.grad, ndz, rtol=1e-5, atol=1e-5)
    assert hf.grad is None and zf.grad is None


def _saved_bytes(fn, *args):
    "Bytes autograd keeps for backward while `fn(*args)` is alive."
    sizes = []
    def pack(t):
        sizes.append(t.numel() * t.element_size())
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*args)
    return sum(sizes), out


def test_saved_for_backward_is_o_bv_not_o_bnv():
    "Besides its inputs, the fused head keeps only the (b, v) arg-max; the naive one keeps the (b, n, v) scores."
    b, n, d, v = 4, 64, 8, 1000
    h, z, _ = _inputs(b, n, d, v)
    inputs = h.numel() * h.element_size() + z.numel() * z.element_size()
    fused, _ = _saved_bytes(lexical_maxpool, h, z)
    naive, _ = _saved_bytes(naive_lexical_maxpool, h, z)
    assert fused - inputs <= b * v * 2  # int16 patch indices
    assert naive - inputs >= b * n * v * 4  # the fp32 scores
    assert naive >= 20 * fused


def test_autocast_bf16_like_naive():
    "Under CPU autocast the scores are bf16 (as the naive einsum's) and fp32 parameters get fp32 gradients."
    h, z, w = _inputs(2, 16, 32, 64, seed=11)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fv, fa = lexical_maxpool(h, z)
        nv, na = naive_lexical_maxpool(h, z)
    assert fv.dtype == nv.dtype == torch.bfloat16
    torch.testing.assert_close(fv, nv)
    (fv.float() * w).sum().backward()
    assert h.grad.dtype == z.grad.dtype == torch.float32


@pytest.mark.parametrize("args, msg", [
    (((2, 3), (4, 3)), "expected \\(batch, patches, width\\)"),
    (((2, 3, 4), (4,)), "expected \\(vocab, width\\)"),
    (((2, 3, 4), (5, 3)), "widths differ"),
    (((2, 0, 4), (5, 4)), "no patches"),
])
def test_shape_errors(args, msg):
    with pytest.raises(ValueError, match=msg):
        lexical_maxpool(torch.randn(*args[0]), torch.randn(*args[1]))


def test_argument_errors():
    h, z = torch.randn(2, 3, 4), torch.randn(5, 4)
    with pytest.raises(ValueError, match="chunk_size"): lexical_maxpool(h, z, chunk_size=0)
    with pytest.raises(ValueError, match="backend"): lexical_maxpool(h, z, backend="triton")
    with pytest.raises(ValueError, match="floating point"): lexical_maxpool(h.long(), z.long())


def test_chunk_sizes_bound_the_temporaries():
    fwd, bwd = chunk_sizes(32, 256, 576, 20000)
    assert fwd * 32 * 256 <= M.CHUNK_ELEMENTS["cpu"] and bwd * 32 * 576 <= M.CHUNK_ELEMENTS["cpu"]
    assert chunk_sizes(1, 1, 1, 10) == (10, 10)  # never longer than the vocabulary
    assert chunk_sizes(256, 256, 4096, 32000)[0] == M.MIN_CHUNK  # a huge batch keeps the matmul wide enough
    assert chunk_sizes(256, 256, 4096, 32000, "cuda")[0] > chunk_sizes(256, 256, 4096, 32000)[0]
    assert chunk_sizes(4, 4, 4, 100, chunk_size=30) == (30, 30)


@pytest.mark.slow
def test_compile_backend_on_cpu():
    "The torch.compile path (the CUDA default) gives the same values, indices and gradients (checked on CPU here)."
    h, z, w = _inputs(3, 20, 16, 130, seed=13)
    fv, fa, fdh, fdz = _run(lexical_maxpool, h, z, w, chunk_size=50, backend="compile")
    nv, na, ndh, ndz = _run(naive_lexical_maxpool, h, z, w)
    torch.testing.assert_close(fv, nv, rtol=1e-5, atol=1e-5)
    assert (fa == na).all()
    torch.testing.assert_close(fdh, ndh, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fdz, ndz, rtol=1e-5, atol=1e-5)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_auto_path_equals_naive(dtype):
    "On CUDA the automatic path (torch.compile) equals the naive head in values, indices and gradients."
    assert M._resolve_backend("auto", torch.empty(1, device="cuda")) in ("compile", "eager")
    h, z, w = _inputs(8, 64, 128, 3000, dtype=dtype, seed=17, device="cuda")
    fv, fa, fdh, fdz = _run(lexical_maxpool, h, z, w)
    nv, na, ndh, ndz = _run(naive_lexical_maxpool, h, z, w)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=3e-2, atol=3e-2)
    torch.testing.assert_close(fv, nv, **tol)
    safe = _no_near_ties(h, z, 1e-3 if dtype == torch.float32 else 0.05)
    assert (fa == na)[safe].all()
    if dtype == torch.float32:
        torch.testing.assert_close(fdh, ndh, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(fdz, ndz, rtol=1e-4, atol=1e-4)
    rdh, rdz = _reference_grads(h, z, w, fa)  # bf16: against fp32 through the same winners
    torch.testing.assert_close(fdh.float(), rdh, rtol=3e-2, atol=3e-2)
    torch.testing.assert_close(fdz.float(), rdz, rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_numba_backward_is_the_sparse_backward_bit_for_bit(dtype, monkeypatch):
    "The numba kernels add each gradient's terms in the CSR product's order: a change of path moves no trained bit."
    h, z, w = _inputs(5, 33, 24, 700, dtype=dtype, seed=3)
    grads = {}
    for path in ("numba", "sparse"):
        monkeypatch.setattr(M.LexicalMaxPool, "cpu_backward", path)
        grads[path] = _run(lexical_maxpool, h, z, w, chunk_size=128)
    for a, b in zip(grads["numba"], grads["sparse"]): assert torch.equal(a, b)
    assert grads["numba"][2].abs().sum() > 0 and grads["numba"][3].abs().sum() > 0
