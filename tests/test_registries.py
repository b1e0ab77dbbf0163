"""Each extension point's registry and the params schema name the same choices: a `Literal` in `lexvla.params` lists
exactly the registry's keys, so a name the schema accepts is one the code dispatches on (issue 22). `lexvla.params`
itself imports no torch; these tests import both sides."""
import subprocess
import sys
import typing

import pytest

from lexvla import batches, losses, model, params, prepare, vocab, worlds


def choices(cls, field: str) -> set[str]:
    "The `Literal` choices of a params dataclass field."
    tp = typing.get_type_hints(cls)[field]
    assert typing.get_origin(tp) is typing.Literal, f"{cls.__name__}.{field} is not a Literal"
    return set(typing.get_args(tp))


@pytest.mark.parametrize("cls, field, registry", [
    (params.VariantSpec, "reg", losses.REGULARIZERS),
    (params.VariantSpec, "model", model.VARIANTS),
    (params.VocabParams, "filter", vocab.FILTERS),
    (params.PrepareParams, "kind", {"embedded": None, **prepare.READERS}),  # embedded scenes are drawn, not read
    (params.EvalSetSpec, "format", prepare.EVAL_FORMATS),
    (params.PrepareParams, "world", worlds.WORLDS),
    (params.TrainParams, "loader", batches.BATCH_SOURCES),
], ids=["regularisers", "model variants", "vocabulary filters", "dataset readers", "eval set formats", "data worlds",
        "batch sources"])
def test_schema_choices_are_the_registry_keys(cls, field, registry):
    assert choices(cls, field) == set(registry)


def test_every_registered_regulariser_dispatches_to_its_own_function():
    "Each registry entry is what `LexicalLoss.penalty` calls (no fall-through to another regulariser)."
    import torch
    s = torch.nn.functional.normalize(torch.rand(5, 40, generator=torch.Generator().manual_seed(0)), dim=-1)
    for name, r in losses.REGULARIZERS.items():
        loss = losses.create_loss(name)
        want = torch.zeros(()) if r.fn is None else r.fn(s, **r.settings)
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
    from lexvla.text import TINY_WORDS
    from lexvla.trainstep import StepContext, make_accelerator, make_optimizer, regularised, train_step

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
        acc = make_accelerator("cpu", "no")  # fp32, whatever an earlier run in this process used
        opt, sched = make_optimizer(m, tp)
        m, opt = acc.prepare(m, opt)
        grads = {}  # as the optimiser sees them (its first step's learning rate is 0 in the warmup)
        opt.step = lambda *a, **k: grads.update({n: p.grad.clone() for n, p in m.named_parameters()
                                                 if p.grad is not None})
        loss_fn = losses.create_loss(reg, lambda_img=0.5, lambda_txt=0.25, warmup_steps=0, gather=False)
        _, parts = train_step(m, batch, 0, StepContext(loss_fn, acc, opt, sched, tp))
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


def scaled_l1(s, scale=1.0):
    "A regulariser with a setting of its own: `scale · Σ_j p̄_j`."
    return scale * s.abs().mean(0).sum()


@pytest.fixture
def scaled_l1_registered():
    losses.register_regularizer("scaled_l1", scaled_l1, settings={"scale": 1.0})
    yield "scaled_l1"
    del losses.REGULARIZERS["scaled_l1"]


def _tiny_run(spec, variant="custom"):
    "A run as `train.open_run` leaves it (params with the tiny preset, no caches), for `attach_model` alone."
    import yaml
    from types import SimpleNamespace
    from conftest import ROOT
    d = yaml.safe_load((ROOT / "params.yaml").read_text())
    d["model"] = {"preset": "tiny"}
    d["train"].update(text_cache=False, image_cache=False)
    p = params.params_from_dict(d, source="test")
    return SimpleNamespace(params=p, tp=p.train, spec=spec, variant=variant, model=None, loss_fn=None, cache=None,
                           icache=None)


def test_a_regulariser_setting_travels_with_its_variant(scaled_l1_registered, tmp_path):
    """Issue 34: a variant's `settings` reach its regulariser through `train.attach_model`, which names none: a
    regulariser registered with a setting of its own trains with the variant's value; a setting it lacks is refused
    by its dotted key before the model is built; params.yaml's method variant gives the overuse share as before."""
    import torch
    from lexvla.text import TINY_WORDS
    from lexvla.train import attach_model
    from lexvla.trainstep import StepContext, make_accelerator, make_optimizer, regularised, train_step

    spec = params.VariantSpec(model="lexvla", reg=scaled_l1_registered, lam=0.5, settings={"scale": 3.0})
    run = attach_model(_tiny_run(spec), tmp_path, tmp_path)
    assert run.loss_fn.settings == {"scale": 3.0}
    g = torch.Generator().manual_seed(0)
    words = [w for w in TINY_WORDS if w.isalpha()]
    caps = [" ".join(words[int(i)] for i in torch.randint(len(words), (5,), generator=g)) for _ in range(4)]
    batch = {"pixels": torch.randn(4, 3, 32, 32, generator=g), "keys": [], "captions": caps}
    m = run.model
    ref = m(pixels=batch["pixels"], captions=batch["captions"])  # the vectors train_step will see
    acc = make_accelerator("cpu", "no")
    opt, sched = make_optimizer(m, run.tp)
    m, opt = acc.prepare(m, opt)
    _, parts = train_step(m, batch, run.tp.reg_warmup_steps, StepContext(run.loss_fn, acc, opt, sched, run.tp))
    r = regularised(ref, run.tp.reg_on)
    want = 0.5 * 3.0 * float(scaled_l1(r["image_weights"]).detach())  # λ · w · Ω with the variant's scale, w = 1
    assert float(parts["image_reg_loss"].detach()) == pytest.approx(want, rel=1e-5)

    bad = params.VariantSpec(model="lexvla", reg=scaled_l1_registered, lam=None, settings={"scal": 3.0})
    half = _tiny_run(bad, "typo")
    with pytest.raises(params.ParamsError, match=r"train\.variants\.typo\.settings\.scal: not a setting of regulariser "
                                                 r"'scaled_l1' \(its settings: scale\)"):
        attach_model(half, tmp_path, tmp_path)
    assert half.model is None  # refused before the model was built
    wrong = params.VariantSpec(model="lexvla", reg="overuse", lam=None, settings={"share": "max"})
    with pytest.raises(params.ParamsError, match=r"train\.variants\.custom\.settings\.share: got 'max'"):
        attach_model(_tiny_run(wrong), tmp_path, tmp_path)

    method = _tiny_run(None).params.train.variants["lexvla"]  # params.yaml's: the value train.overuse_share gave
    assert attach_model(_tiny_run(method), tmp_path, tmp_path).loss_fn.settings == {"detach_share": False,
                                                                                     "share": "mean"}


@pytest.fixture
def neox_lm(tmp_path):
    """A tiny random GPT-NeoX (Pythia's architecture: `gpt_neox.embed_in`, `.layers`, `.final_layer_norm`) saved as a
    transformers folder with the tiny tokenizer, and its text tower registered the way a researcher would."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM
    from lexvla import text

    class Tower(text.TextTower):
        "GPT-NeoX: the Llama family's forward under other names."
        decoder, norm = "gpt_neox", "final_layer_norm"

    tok = text._left_padded(text.tiny_tokenizer())
    cfg = GPTNeoXConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                        num_attention_heads=4, max_position_embeddings=128, pad_token_id=tok.pad_token_id)
    import torch
    torch.manual_seed(0)
    GPTNeoXForCausalLM(cfg).save_pretrained(tmp_path / "neox")
    tok.save_pretrained(tmp_path / "neox")
    overrides = {"lm": {"source": "hf", "path": str(tmp_path / "neox"), "pretrained": True}}
    with pytest.raises(TypeError, match="no text tower for model_type 'gpt_neox'"):
        model.create_model("tiny", **overrides)  # before the registration: a clear error, not a wrong forward
    text.register_text_tower("gpt_neox")(Tower)
    yield Tower, overrides
    del text.TEXT_TOWERS["gpt_neox"]


def test_a_registered_text_tower_is_the_one_that_trains(neox_lm):
    "Issue 22's third walk-through: a second LM architecture is one small class, and LexVLA trains one step on it."
    import torch
    from types import SimpleNamespace

    from lexvla.text import positions_from_mask
    from lexvla.trainstep import StepContext, make_accelerator, make_optimizer, train_step

    tower_cls, overrides = neox_lm
    m = model.create_model("tiny", seed=0, **overrides)
    assert type(m.tower) is tower_cls and m.lora_layers == [1, 2]  # LoRA on the last 2 of its 3 layers
    caps = ["a red ring", "two small blue squares left of a green star", "a pink heart", "a big yellow circle"]
    tok = m.tokenize(caps)
    with torch.no_grad():  # the text vectors are the NeoX model's own last state times its LM-head rows
        own = m.lm.gpt_neox(**tok, position_ids=positions_from_mask(tok["attention_mask"])).last_hidden_state[:, -1]
        want = torch.nn.functional.normalize(m.lexical_activation(own @ m.text_codebook.T), dim=-1)
        torch.testing.assert_close(m(pixels=torch.zeros(4, 3, 32, 32), captions=caps)["text_features"], want)
    batch = {"pixels": torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0)), "keys": [],
             "captions": caps}
    tp = SimpleNamespace(grad_clip=0.0, reg_on="max", weight_decay=0.0, codebook_weight_decay=0.0, lr=1e-2,
                         warmup_steps=0, steps=10)
    acc = make_accelerator("cpu", "no")
    opt, sched = make_optimizer(m, tp)
    m, opt = acc.prepare(m, opt)
    lora = {n: p.detach().clone() for n, p in m.named_parameters() if "lora_B" in n}
    assert lora and all(".gpt_neox.layers." in n for n in lora)
    loss_fn = losses.create_loss("overuse", warmup_steps=0, gather=False)
    _, parts = train_step(m, batch, 0, StepContext(loss_fn, acc, opt, sched, tp))
    assert torch.isfinite(parts["loss"])
    moved = [n for n, p in m.named_parameters() if n in lora and not torch.equal(p.detach(), lora[n])]
    assert moved  # the step trained the NeoX layers' LoRA (B starts at zero: it moves only with a gradient)


def test_an_unregistered_filter_or_variant_is_refused_by_name():
    "A name nobody registered is refused with the registered ones, never read as another entry (no fall-through)."
    from lexvla.text import tiny_tokenizer
    with pytest.raises(ValueError, match="vocabulary filter 'nouns' is not registered: expected one of alpha2, "
                                         "word_start, word_start_lower, words"):
        vocab.build_vocabulary(tiny_tokenizer(), "nouns")
    with pytest.raises(ValueError, match="vocabulary filter 'nouns' is not registered"):
        vocab.keep_piece("red", True, "nouns")
    with pytest.raises(ValueError, match="variant: got 'sparse', expected one of lexvla, bow, dense"):
        model.create_model("tiny", variant="sparse")


@pytest.fixture
def vowel_filter():
    "A filter a researcher adds: word-start pieces that begin with a vowel."
    vocab.register_filter("vowel_start")(lambda text, min_zipf: text[0] in "aeiou")
    yield "vowel_start"
    del vocab.FILTERS["vowel_start"]


def test_a_registered_filter_is_the_one_that_builds_the_vocabulary(vowel_filter):
    from lexvla.text import tiny_tokenizer
    tok = tiny_tokenizer()
    v = vocab.build_vocabulary(tok, vowel_filter)
    base = vocab.build_vocabulary(tok, "word_start")  # the same text and word-start rules, no vowel rule
    keep = [(i, w) for i, w in zip(base.ids.tolist(), base.words) if w[0] in "aeiou"]
    assert keep and (v.ids.tolist(), v.words) == ([i for i, _ in keep], [w for _, w in keep])
    assert v.filter == "vowel_start" and len(v.words) < len(base.words)
    # and the model's vocabulary is the filter's (a ModelParams built in code: the params schema's Literal names the
    # built-in filters only, so a params file cannot select it yet)
    import dataclasses
    cfg = params.model_config("tiny")
    m = model.LexVLA(dataclasses.replace(cfg, vocab=dataclasses.replace(cfg.vocab, filter=vowel_filter)))
    assert m.vocab.words == v.words and m.vocab.filter == vowel_filter


@pytest.fixture(params=[("dense_again", {"lexical": False}, "dense"), ("bow_again", {"bow": True}, "bow")],
                ids=["dense-like", "bow-like"])
def test_variant(request):
    "A variant registered in the test with the flags of a built-in one, and the built-in it should behave as."
    name, flags, like = request.param
    model.register_variant(name, **flags)
    yield name, like
    del model.VARIANTS[name]


def test_a_registered_variant_is_the_one_that_builds(test_variant):
    "`LexVLA` reads the registered entry: the new name builds the same parameters and vectors as its look-alike."
    import torch
    name, like = test_variant
    m, ref = model.create_model("tiny", variant=name), model.create_model("tiny", variant=like)
    assert (m.variant, m.lexical, m.bow, m.dim) == (name, ref.lexical, ref.bow, ref.dim)
    assert (m.lm is None) == (like == "bow") and hasattr(m, "visual_codebook") == (like != "dense")
    sd, want = m.state_dict(), ref.state_dict()
    assert sd.keys() == want.keys() and all(torch.equal(sd[k], want[k]) for k in sd)
    px = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    caps = ["a red ring", "two blue squares left of a star"]
    with torch.no_grad():
        got, exp = m(px, caps), ref(px, caps)
    assert got.keys() == exp.keys() and all(torch.equal(got[k], exp[k]) for k in got)
