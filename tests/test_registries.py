"""Each extension point's registry and the params schema name the same choices: a `Literal` in `lexvla.params` lists
exactly the registry's keys, so a name the schema accepts is one the code dispatches on (issue 22). `lexvla.params`
itself imports no torch; these tests import both sides."""
import subprocess
import sys
import typing

import pytest

from lexvla import losses, model, params, vocab


def choices(cls, field: str) -> set[str]:
    "The `Literal` choices of a params dataclass field."
    tp = typing.get_type_hints(cls)[field]
    assert typing.get_origin(tp) is typing.Literal, f"{cls.__name__}.{field} is not a Literal"
    return set(typing.get_args(tp))


@pytest.mark.parametrize("cls, field, registry", [
    (params.VariantSpec, "reg", losses.REGULARIZERS),
    (params.VariantSpec, "model", model.VARIANTS),
    (params.VocabParams, "filter", vocab.FILTERS),
], ids=["regularisers", "model variants", "vocabulary filters"])
def test_schema_choices_are_the_registry_keys(cls, field, registry):
    assert choices(cls, field) == set(registry)


def test_every_registered_regulariser_dispatches_to_its_own_function():
    "Each registry entry is what `LexicalLoss.penalty` calls (no fall-through to another regulariser)."
    import torch
    s = torch.nn.functional.normalize(torch.rand(5, 40, generator=torch.Generator().manual_seed(0)), dim=-1)
    for name, r in losses.REGULARIZERS.items():
        loss = losses.create_loss(name)
        want = torch.zeros(()) if r.fn is None else r.fn(s, **{k: getattr(loss, k) for k in r.options})
        assert torch.equal(loss.penalty(s), want), name
    assert not torch.equal(losses.create_loss("overuse").penalty(s), losses.create_loss("flops").penalty(s))


def test_params_imports_no_torch():
    "The schema side stays light: loading lexvla.params does not import torch."
    code = "import sys, lexvla.params; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "False"


def l1_penalty(s):
    "A regulariser a researcher adds: the L1 norm of the mean activation, `Σ_j p̄_j` (not in the package)."
    return s.abs().mean(0).sum()


@pytest.fixture
def l1_registered():
    losses.register_regularizer("l1", l1_penalty)
    yield "l1"
    del losses.REGULARIZERS["l1"]


def test_a_registered_regulariser_is_the_one_that_trains(l1_registered):
    "Issue 22's walk-through: one `register_regularizer` call, and `train_step` trains with it (not with FLOPs)."
    import torch
    from types import SimpleNamespace
    from accelerate import Accelerator
    from lexvla.text import TINY_WORDS
    from lexvla.train import make_optimizer, regularised, train_step

    g = torch.Generator().manual_seed(0)
    words = [w for w in TINY_WORDS if w.isalpha()]
    caps = [" ".join(words[int(i)] for i in torch.randint(len(words), (5,), generator=g)) for _ in range(4)]
    batch = {"pixels": torch.randn(4, 3, 32, 32, generator=g), "keys": [], "captions": caps}
    tp = SimpleNamespace(grad_clip=0.0, reg_on="max", weight_decay=0.0, codebook_weight_decay=0.0, lr=1e-3,
                         warmup_steps=1, steps=10)
    runs = {}
    for reg in (l1_registered, "flops"):
        m = model.create_model("tiny", seed=0)
        ref = m(pixels=batch["pixels"], captions=batch["captions"])  # the same vectors train_step will see
        acc = Accelerator(cpu=True)
        opt, sched = make_optimizer(m, tp)
        m, opt = acc.prepare(m, opt)
        grads = {}  # as the optimiser sees them (its first step's learning rate is 0 in the warmup)
        opt.step = lambda *a, **k: grads.update({n: p.grad.clone() for n, p in m.named_parameters()
                                                 if p.grad is not None})
        loss_fn = losses.create_loss(reg, lambda_img=0.5, lambda_txt=0.25, warmup_steps=0, gather=False)
        _, parts = train_step(m, batch, loss_fn, 0, acc, opt, sched, tp)
        r = regularised(ref, "max")
        on_img, on_txt = r.get("image_weights", ref["image_features"]), r.get("text_weights", ref["text_features"])
        fn = losses.REGULARIZERS[reg].fn
        val = lambda t: float(t.detach())
        assert val(parts["image_reg_loss"]) == pytest.approx(0.5 * val(fn(on_img)), rel=1e-5), reg  # λ·w·Ω, w = 1
        assert val(parts["text_reg_loss"]) == pytest.approx(0.25 * val(fn(on_txt)), rel=1e-5), reg
        runs[reg] = (val(parts["loss"]), grads)
    assert runs["l1"][0] != pytest.approx(runs["flops"][0], rel=1e-4)  # the new penalty, not a silent FLOPs
    moved = [k for k, v in runs["l1"][1].items() if not torch.equal(v, runs["flops"][1][k])]
    assert moved  # and the gradient it drives differs from FLOPs'
