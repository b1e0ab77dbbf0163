"""LexVLA's losses (lexvla/losses.py) against plain, obviously-correct versions on random inputs (method §5)."""
import math

import pytest
import torch
import torch.nn.functional as F

from lexvla.losses import (LexicalLoss, clip_contrastive, create_loss, elu1p, flops_regularizer, overuse_penalty,
                           quadratic_warmup, word_activation)


def _ref_penalties(s):
    "FLOPs and overuse, word by word in Python floats."
    b, v = s.shape
    pbar = [sum(abs(float(s[i, j])) for i in range(b)) / b for j in range(v)]
    total = sum(pbar)
    return sum(p * p for p in pbar), (sum(p / total * p * p for p in pbar) if total else 0.0)


def _ref_infonce(img, txt, scale):
    "Symmetric InfoNCE as two explicit cross-entropies, with a hand-written log-sum-exp."
    sim = (scale * img.double() @ txt.double().T).tolist()
    b = len(sim)
    def ce(rows):
        return sum(-r[i] + max(r) + math.log(sum(math.exp(x - max(r)) for x in r)) for i, r in enumerate(rows)) / b
    return (ce(sim) + ce([list(c) for c in zip(*sim)])) / 2


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("shape", [(1, 5), (7, 13), (16, 40)], ids=str)
def test_penalties_equal_loops(seed, shape):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(*shape, generator=g, dtype=torch.float64) * (seed + 1)
    s[:, ::3] = 0  # some words never fire
    flops, overuse = _ref_penalties(s)
    assert flops_regularizer(s).item() == pytest.approx(flops, rel=1e-12)
    assert overuse_penalty(s).item() == pytest.approx(overuse, rel=1e-12)
    assert overuse_penalty(s, detach_share=True).item() == pytest.approx(overuse, rel=1e-12)


def test_penalty_gradients_equal_autograd_of_the_formula():
    "Gradients equal those of the formula written with plain tensor ops (share differentiated, or held constant)."
    s = torch.randn(6, 9, dtype=torch.float64, requires_grad=True)
    def formula(x, detach):
        p = x.abs().sum(0) / x.shape[0]
        share = p / p.sum()
        return ((share.detach() if detach else share) * p * p).sum()
    for detach in (False, True):
        (ga,) = torch.autograd.grad(overuse_penalty(s, detach_share=detach), s)
        (gr,) = torch.autograd.grad(formula(s, detach), s)
        torch.testing.assert_close(ga, gr)
    assert torch.autograd.gradcheck(lambda x: overuse_penalty(x), (s,))
    assert torch.autograd.gradcheck(lambda x: flops_regularizer(x), (s,))


def test_overuse_reweights_towards_frequent_words():
    "Relative to a rare word, an always-on word pays (p̄_common / p̄_rare) times more under overuse than under FLOPs."
    s = torch.zeros(10, 2, dtype=torch.float64)
    s[:, 0], s[0, 1] = 0.2, 1.0  # p̄ = 0.2 (every sample) vs 0.1 (one sample)
    p = word_activation(s)
    assert p.tolist() == pytest.approx([0.2, 0.1])
    flops_ratio = 0.2 ** 2 / 0.1 ** 2
    overuse_ratio = (0.2 / 0.3 * 0.2 ** 2) / (0.1 / 0.3 * 0.1 ** 2)
    assert overuse_ratio == pytest.approx(flops_ratio * 2)
    assert overuse_penalty(s).item() == pytest.approx((0.2 / 0.3) * 0.04 + (0.1 / 0.3) * 0.01)


def test_zero_and_bad_inputs():
    assert overuse_penalty(torch.zeros(4, 6)).item() == 0.0
    assert flops_regularizer(torch.zeros(4, 6)).item() == 0.0
    with pytest.raises(ValueError, match="expected \\(batch, vocab\\)"):
        flops_regularizer(torch.zeros(6))


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("b, dim, scale", [(2, 4, 1.0), (8, 32, 1 / 0.07), (5, 17, 100.0)])
def test_infonce_equals_reference(seed, b, dim, scale):
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(b, dim, generator=g), dim=-1)
    txt = F.normalize(torch.randn(b, dim, generator=g), dim=-1)
    got = clip_contrastive(img, txt, torch.tensor(scale))
    assert got.item() == pytest.approx(_ref_infonce(img, txt, scale), rel=1e-5, abs=1e-6)


def test_infonce_arguments():
    img = F.normalize(torch.randn(3, 5), dim=-1)
    assert clip_contrastive(img, img, 0.0).item() == pytest.approx(math.log(3))
    with pytest.raises(ValueError, match="same shape"): clip_contrastive(img, img[:2], 1.0)
    with pytest.raises(ValueError, match="expected a scalar"): clip_contrastive(img, img, torch.ones(2))
    scale = torch.tensor(10.0, requires_grad=True)  # the temperature is learnable: it gets a gradient
    clip_contrastive(img, F.normalize(torch.randn(3, 5), dim=-1), scale).backward()
    assert scale.grad is not None and scale.grad.item() != 0


def test_quadratic_warmup():
    assert [quadratic_warmup(t, 8, 2.0) for t in (-3, 0, 2, 4, 8, 100)] == pytest.approx([0, 0, 0.125, 0.5, 2.0, 2.0])
    assert quadratic_warmup(None, 8, 2.0) == 2.0 and quadratic_warmup(5, 0, 2.0) == 2.0
    with pytest.raises(ValueError, match="warmup_steps"): quadratic_warmup(1, -2, 1.0)


def test_elu1p():
    x = torch.linspace(-5, 5, 101, dtype=torch.float64)
    ref = torch.where(x > 0, x + 1, torch.exp(x))
    torch.testing.assert_close(elu1p(x), ref)


@pytest.mark.parametrize("kind", ["overuse", "flops", "none"])
def test_loss_parts_equal_reference(kind):
    g = torch.Generator().manual_seed(3)
    img = F.normalize(elu1p(torch.randn(6, 25, generator=g)), dim=-1).requires_grad_()
    txt = F.normalize(elu1p(torch.randn(6, 25, generator=g)), dim=-1).requires_grad_()
    loss = create_loss(kind, lambda_img=1e-2, lambda_txt=3e-2, warmup_steps=20)
    assert isinstance(loss, LexicalLoss) and loss.reg == kind
    for step, w in ((0, 0.0), (5, 1 / 16), (10, 0.25), (20, 1.0), (50, 1.0), (None, 1.0)):
        parts = loss(img, txt, 1 / 0.07, step)
        assert set(parts) == {"contrastive_loss", "image_reg_loss", "text_reg_loss", "loss", "reg_weight"}
        ref_c = _ref_infonce(img.detach(), txt.detach(), 1 / 0.07)
        pen = {"overuse": lambda s: _ref_penalties(s)[1], "flops": lambda s: _ref_penalties(s)[0],
               "none": lambda s: 0.0}[kind]
        w = 0.0 if kind == "none" else w
        ref_i, ref_t = 1e-2 * w * pen(img.detach()), 3e-2 * w * pen(txt.detach())
        assert parts["contrastive_loss"].item() == pytest.approx(ref_c, rel=1e-5)
        assert parts["image_reg_loss"].item() == pytest.approx(ref_i, rel=1e-5, abs=1e-12)
        assert parts["text_reg_loss"].item() == pytest.approx(ref_t, rel=1e-5, abs=1e-12)
        assert parts["loss"].item() == pytest.approx(ref_c + ref_i + ref_t, rel=1e-5)
        assert parts["reg_weight"].item() == pytest.approx(w)
    parts["loss"].backward()
    assert img.grad is not None and txt.grad is not None


def test_regulariser_gradient_is_off_without_penalty():
    "Kind none: the regulariser parts are constants (the dense baseline trains on InfoNCE alone)."
    img = F.normalize(torch.randn(4, 8), dim=-1).requires_grad_()
    txt = F.normalize(torch.randn(4, 8), dim=-1)
    p = create_loss("none")(img, txt, 10.0, step=3)
    (gl,) = torch.autograd.grad(p["loss"], img)
    (gc,) = torch.autograd.grad(clip_contrastive(img, txt, 10.0), img)
    torch.testing.assert_close(gl, gc)


def test_create_loss_errors():
    with pytest.raises(ValueError, match="expected one of overuse, flops, none"): create_loss("l1")
    with pytest.raises(ValueError, match="lambda_txt"): create_loss("overuse", lambda_txt=float("nan"))
    with pytest.raises(ValueError, match="warmup_steps"): create_loss("flops", warmup_steps=-1)
    with pytest.raises(TypeError): create_loss("flops", lambda_image=1.0)
