"""The model (issue 4): vocabulary filter, towers, lexical heads, variants, presets, save/load; tiny preset (fast)."""
import dataclasses
import json
import math
import re
import shutil

import pytest
import safetensors.torch
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, models
from transformers import PreTrainedTokenizerFast

from lexvla.model import LexVLA, bow_targets, create_model, create_model_from_params, load_trained, save_trained
from lexvla.params import ParamsError, describe_model, list_models, load_params, model_config
from lexvla.sparse import SparseVectors, threshold_for
from lexvla.text import SMOLLM2_GGUF, lm_location, positions_from_mask, smollm2_gguf, tiny_lm, tiny_tokenizer
from lexvla.vocab import FILTERS, Vocabulary, build_vocabulary

CAPS = ["a red ring above a green square", "two blue stars", "one small yellow circle left of a big purple cross"]


@pytest.fixture(scope="module")
def tiny():
    return create_model("tiny").eval()


def pixels(b=3, size=32, seed=0):
    return torch.randn(b, 3, size, size, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- vocabulary (method §2)

def _tok(pieces, **kw):
    t = Tokenizer(models.WordLevel({p: i for i, p in enumerate(pieces)}, unk_token=pieces[0]))
    return PreTrainedTokenizerFast(tokenizer_object=t, **kw)


def test_vocabulary_filter_sentencepiece_known_answer():
    "Llama-2 style pieces: specials, byte fallback, continuations, case, digits, accents, one letter."
    pieces = ["<unk>", "<s>", "</s>", "<0x0A>", "<0x41>", "▁the", "▁The", "the", "▁a", "▁ab", "▁red", "ing",
              "▁42", "▁naïve", "▁x1", "▁ring", "▁RING", "."]
    tok = _tok(pieces, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    want = {"alpha2": ["the", "The", "the", "ab", "red", "ing", "ring", "RING"],
            "word_start": ["the", "The", "ab", "red", "ring", "RING"],
            "word_start_lower": ["the", "ab", "red", "ring"], "words": ["the", "ab", "red", "ring"]}
    ids = {"alpha2": [5, 6, 7, 9, 10, 11, 15, 16], "word_start": [5, 6, 9, 10, 15, 16], "word_start_lower": [5, 9, 10, 15],
           "words": [5, 9, 10, 15]}  # words: all four are listed English words (wordfreq Zipf >= 3)
    for f in FILTERS:
        v = build_vocabulary(tok, f)
        assert v.words == want[f] and v.ids.tolist() == ids[f] and v.size == len(ids[f]), f
    assert build_vocabulary(tok, "word_start_lower", allow=["a"]).words == ["the", "a", "ab", "red", "ring"]
    assert build_vocabulary(tok, "word_start_lower", min_len=3).words == ["the", "red", "ring"]
    # alpha2 keeps both `▁the` and the continuation `the`; the word's index is the word-start piece
    v = build_vocabulary(tok, "alpha2")
    assert v.index("the") == 0 and v.indices("the") == [0, 2]


def test_vocabulary_filter_rejects_unknown_variant():
    with pytest.raises(ValueError, match="'nouns'.*alpha2, word_start, word_start_lower"):
        build_vocabulary(tiny_tokenizer(), "nouns")


def test_vocabulary_word_level_and_tiny_tokenizer():
    v = build_vocabulary(tiny_tokenizer(), "word_start_lower")
    assert {"red", "green", "ring", "square", "crimson"} <= set(v.words)
    assert not {"Red", "NASA", "[PAD]", "[UNK]", ".", "7"} & set(v.words)
    assert v.word(v.index("ring")) == "ring"
    assert "Red" in build_vocabulary(tiny_tokenizer(), "word_start").words


def test_vocabulary_fingerprint():
    a = Vocabulary([3, 5], ["red", "ring"])
    assert a.fingerprint() == Vocabulary([3, 5], ["red", "ring"]).fingerprint()
    assert len(a.fingerprint()) == 64
    assert a.fingerprint() != Vocabulary([3, 6], ["red", "ring"]).fingerprint()
    assert a.fingerprint() != Vocabulary([3, 5], ["red", "rings"]).fingerprint()
    with pytest.raises(KeyError, match="'blue' is not in the vocabulary"):
        a.index("blue")


# ---------------------------------------------------------------- shapes, normalisation, heads

def test_shapes_and_normalisation(tiny):
    V = tiny.vocab.size
    with torch.no_grad():
        out = tiny(pixels(), CAPS)
        patches = tiny.encode_image_patches(pixels())
    assert out["image_features"].shape == (3, V) and out["text_features"].shape == (3, V)
    n = (32 // 8) ** 2
    assert patches.shape == (3, n, V)
    for x in (out["image_features"], out["text_features"], patches):
        torch.testing.assert_close(x.norm(dim=-1), torch.ones(x.shape[:-1]))
        assert (x > 0).all()  # ELU1p > 0 everywhere before sparsification
    assert math.isclose(float(out["logit_scale"]), 1 / 0.07, rel_tol=1e-5)


def test_image_vector_is_maxpool_of_patch_scores(tiny):
    "s_img = normalize(ELU1p(m - mean(m))), m = max_patches H Z_img^T (logit_shift mean), against a plain version."
    x = pixels()
    with torch.no_grad():
        tokens = tiny.vision.forward_features(x)
        assert tokens.shape[1] == 16 + tiny.vision.num_prefix_tokens and tiny.vision.num_prefix_tokens == 5
        h = tiny.adapter(tokens[:, 5:])
        assert tiny.config.logit_shift.image == "mean"
        pooled = (h @ tiny.visual_codebook.T).amax(1)
        ref = F.normalize(F.elu(pooled - pooled.mean(-1, keepdim=True)).add(1), dim=-1)
        torch.testing.assert_close(tiny.encode_image(x), ref)
    literal = create_model("tiny", logit_shift={"text": "none", "image": "none"})
    with torch.no_grad():  # the paper's literal formula: ELU1p of the raw logits (monotone: pool before or after)
        h = literal.adapter(literal.vision.forward_features(x)[:, 5:])
        ref = F.normalize(F.elu(h @ literal.visual_codebook.T).add(1).amax(1), dim=-1)
        torch.testing.assert_close(literal.encode_image(x), ref)


def test_model_vectors_sparsify_against_plain_version(tiny):
    "The model's vectors through lexvla.sparse (method §5): the 1/sqrt(V) threshold and the top k, as plain torch."
    with torch.no_grad():
        x = tiny.encode_image(pixels())
    V = tiny.vocab.size
    assert threshold_for(V) == 1 / math.sqrt(V)
    at = torch.from_numpy(SparseVectors.from_dense(x, threshold=threshold_for(V)).to_dense())
    torch.testing.assert_close(at, torch.where(x > V ** -0.5, x, 0.0), rtol=0, atol=0)
    top = torch.from_numpy(SparseVectors.from_dense(x, topk=5).to_dense())
    assert ((top != 0).sum(-1) == 5).all()
    for i in range(len(x)):
        assert set(top[i].nonzero().flatten().tolist()) == set(x[i].argsort(descending=True)[:5].tolist())


# ---------------------------------------------------------------- text tower (method §3)

def test_split_text_forward_equals_full(tiny):
    with torch.no_grad():
        full = tiny.encode_text(CAPS)
        h, mask = tiny.text_prefix(tiny.tokenize(CAPS))
        assert h.shape[:2] == mask.shape and h.shape[-1] == tiny.width
        torch.testing.assert_close(tiny.encode_text_from_prefix(h, mask), full)
        # a caption's vector does not depend on its batch's padding (the cache re-pads captions)
        torch.testing.assert_close(tiny.encode_text(CAPS[1:2]), full[1:2], rtol=1e-5, atol=1e-6)
        # nor on extra padding added in front of the cached states
        pad = torch.cat([torch.zeros(3, 4, h.shape[-1]), h], 1), torch.cat([torch.zeros(3, 4, dtype=mask.dtype), mask], 1)
        torch.testing.assert_close(tiny.encode_text_from_prefix(*pad), full, rtol=1e-5, atol=1e-6)


def test_split_equals_hf_forward_and_codebook_is_lm_head(tiny):
    "h Z_txt^T equals the LM's own last-token logits on the kept ids; prompt and left padding as specified."
    tok = tiny.tokenize(CAPS)
    assert (tok["attention_mask"][:, -1] == 1).all() and (tok["attention_mask"][:, 0] == 0).any()  # left padding
    first = tiny.tokenizer.convert_ids_to_tokens(tok["input_ids"][0][tok["attention_mask"][0].bool()])
    assert first[:4] == ["this", "sentence", ":", '"'] and first[-4:] == ["one", "word", ":", '"']
    with torch.no_grad():
        logits = tiny.lm(**tok, position_ids=positions_from_mask(tok["attention_mask"])).logits[:, -1]
        mine = tiny.text_logits_from_prefix(*tiny.text_prefix(tok))
    torch.testing.assert_close(mine, logits[:, tiny.vocab.ids], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tiny.text_codebook, tiny.lm.get_output_embeddings().weight[tiny.vocab.ids])


def test_forward_with_text_prefix_equals_captions(tiny):
    with torch.no_grad():
        a = tiny(pixels(), CAPS)
        b = tiny(pixels(), text_prefix=tiny.text_prefix(tiny.tokenize(CAPS)))
    torch.testing.assert_close(a["text_features"], b["text_features"])
    with pytest.raises(ValueError, match="exactly one of captions and text_prefix"):
        tiny(pixels())


# ---------------------------------------------------------------- frozen / trainable

def test_frozen_and_trainable_sets(tiny):
    trainable = {n for n, p in tiny.named_parameters() if p.requires_grad}
    assert "visual_codebook" in trainable and "logit_scale" in trainable
    assert "text_codebook" not in dict(tiny.named_parameters()) and not tiny.text_codebook.requires_grad
    assert not any(n.startswith("vision.") for n in trainable)  # tiny: frozen ViT (the paper's setting)
    lm_trainable = [n for n in trainable if n.startswith("lm.")]
    assert lm_trainable and all("lora_" in n for n in lm_trainable)
    assert {int(n.split(".layers.")[1].split(".")[0]) for n in lm_trainable} == {2, 3} == set(tiny.lora_layers)
    assert tiny.text_prefix_layers == 2
    assert torch.equal(create_model("tiny").visual_codebook.detach(), create_model("tiny").text_codebook)


def test_parameter_counts_match_config(tiny):
    c = tiny.config
    r, d = c.lora.rank, tiny.width
    inter = tiny.lm.config.intermediate_size
    kv = tiny.lm.config.num_key_value_heads * (d // tiny.lm.config.num_attention_heads)
    per_layer = r * ((d + d) * 2 + (d + kv) * 2 + (d + inter) * 2 + (inter + d))  # q o | k v | gate up | down
    counts = tiny.trainable_parameters()
    assert counts["lora"] == per_layer * len(tiny.lora_layers)
    w = tiny.vision.embed_dim
    h = int(w * c.adapter.mlp_ratio)
    block = 4 * w + (w * 3 * w + 3 * w) + (w * w + w) + (w * h + h) + (h * w + w)  # 2 norms, qkv, proj, mlp
    mlp = (w * w + w) + (w * d + d)  # hidden = vision width
    assert counts["adapter"] == block + mlp
    assert counts["codebook"] == tiny.vocab.size * d and counts["vision"] == 0 and counts["temperature"] == 1
    assert counts["total"] == sum(p.numel() for p in tiny.parameters() if p.requires_grad)


def test_frozen_parts_do_not_change_after_a_step():
    m = create_model("tiny").train()
    frozen = {n: p.detach().clone() for n, p in m.named_parameters() if not p.requires_grad}
    buf = m.text_codebook.clone()
    trainable = {n: p.detach().clone() for n, p in m.named_parameters() if p.requires_grad}
    out = m(pixels(), CAPS)
    logits = out["logit_scale"] * out["image_features"] @ out["text_features"].T
    loss = (F.cross_entropy(logits, torch.arange(3)) + F.cross_entropy(logits.T, torch.arange(3))) / 2
    loss.backward()
    assert all(p.grad is None for p in m.parameters() if not p.requires_grad)
    torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2).step()
    for n, p in m.named_parameters():
        if not p.requires_grad: assert torch.equal(p, frozen[n]), n
    assert torch.equal(m.text_codebook, buf)
    changed = [n for n, p in m.named_parameters() if p.requires_grad and not torch.equal(p, trainable[n])]
    assert "visual_codebook" in changed and any("adapter" in n for n in changed) and any("lora_A" in n for n in changed)


def test_unfrozen_vision_is_trained():
    m = create_model("tiny", vision={"frozen": False}).train()
    assert m.vision.training and m.trainable_parameters()["vision"] == sum(p.numel() for p in m.vision.parameters())
    m(pixels(), CAPS)["image_features"].sum().backward()
    assert m.vision.patch_embed.proj.weight.grad is not None
    frozen = create_model("tiny").train()
    assert not frozen.vision.training  # a frozen ViT stays in eval mode


# ---------------------------------------------------------------- variants

@pytest.mark.parametrize("variant", ["lexvla", "bow", "dense"])
def test_each_variant_forward_backward(variant):
    m = create_model("tiny", variant=variant).train()
    assert m.variant == variant
    out = m(pixels(), CAPS)
    dim = 32 if variant == "dense" else m.vocab.size
    assert out["image_features"].shape == (3, dim) and out["text_features"].shape == (3, dim)
    logits = out["logit_scale"] * out["image_features"] @ out["text_features"].T
    F.cross_entropy(logits, torch.arange(3)).backward()
    grads = {n for n, p in m.named_parameters() if p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0}
    assert any(n.startswith("adapter.") for n in grads) and "logit_scale" in grads
    if variant == "dense":
        assert {"image_proj.weight", "text_proj.weight"} <= grads and not hasattr(m, "visual_codebook")
        assert m.encode_image_patches(pixels()).shape == (3, 16, 32)
    else:
        assert "visual_codebook" in grads
    if variant == "bow":
        assert m.lm is None and not any("lora_" in n for n, _ in m.named_parameters())
        torch.testing.assert_close(out["text_features"], bow_targets(CAPS, m.vocab))
        with pytest.raises(RuntimeError, match="no LM forward"):
            m.text_prefix(m.tokenize(CAPS))
    else:
        # B of LoRA starts at zero, so only B gets a gradient on the first step
        assert any("lora_B" in n for n in grads)


def test_bow_targets_content_words():
    v = build_vocabulary(tiny_tokenizer(), "word_start_lower")
    t = bow_targets(["Two RED rings above the green square, zorbly.", "of the"], v)
    assert sorted(v.word(i) for i in t[0].nonzero().flatten()) == ["green", "red", "rings", "square"]
    torch.testing.assert_close(t[0], torch.where(t[0] > 0, 0.5, 0.0))
    assert t[1].abs().sum() == 0


def test_gradient_checkpointing_gives_same_gradients():
    grads = []
    for gc in (False, True):
        m = create_model("tiny", grad_checkpointing=gc, variant="dense").train()
        assert all(layer.gradient_checkpointing == gc for layer in m.lm.model.layers)
        m.encode_text(CAPS).square().sum().backward()
        grads.append({n: p.grad for n, p in m.named_parameters() if "lora_B" in n})
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n])


def test_variant_is_a_model_argument():
    "lexvla | bow | dense; the regulariser ablations (flops, none) are train variants of the lexvla model."
    for v in ("sparse", "flops", "none"):
        with pytest.raises(ValueError, match=f"variant: got '{v}', expected one of lexvla, bow, dense"):
            LexVLA(model_config("tiny"), variant=v)
    with pytest.raises(ValueError, match="variant: got 'flops'"):
        create_model("tiny", variant="flops")
    with pytest.raises(ParamsError, match="model.variant: unknown key"):  # not a key of the model config
        model_config("tiny", variant="bow")


# ---------------------------------------------------------------- presets, params

def test_presets_build_and_refuse_bad_values():
    assert {"tiny", "embedded", "paper"} <= set(list_models()) and list_models("pa*") == ["paper"]
    assert "frozen pretrained dinov2" in " ".join(describe_model("embedded").lower().split())
    with pytest.raises(ParamsError, match='model.preset: got "tiney", expected one of .*tiny'):
        create_model("tiney")
    with pytest.raises(ParamsError, match="model.vision.widht: unknown key"):
        model_config("tiny", vision={"widht": 8})
    with pytest.raises(ParamsError, match="model.lora.layers: 9 is out of range"):
        create_model("tiny", lora={"layers": [9]})
    with pytest.raises(ParamsError, match="model.lora.target_modules: 'qkv'"):
        create_model("tiny", lora={"target_modules": ["qkv"]})
    with pytest.raises(ParamsError, match="model.vision.timm_name"):
        create_model("tiny", vision={"timm_name": "no_such_vit"})


def test_presets_are_valid_params_and_params_yaml_is_embedded():
    for name in list_models():
        assert model_config(name).preset == name
    assert load_params().model == model_config("embedded"), "params.yaml's model is the embedded preset, unchanged"


def test_create_model_from_params_variant_and_seed():
    mp = model_config("tiny")
    m = create_model_from_params(mp, variant="dense", seed=3)
    assert m.variant == "dense" and m.seed == 3
    d = create_model_from_params(mp)
    assert d.variant == "lexvla" and d.seed == 0
    same = create_model("tiny")
    assert all(torch.equal(a, b) for a, b in zip(d.state_dict().values(), same.state_dict().values()))
    bad = dataclasses.replace(mp, preset="nope")
    with pytest.raises(ParamsError, match='model.preset: got "nope"'):
        create_model_from_params(bad)


def test_lora_choices():
    m = create_model("tiny", lora={"layers": None, "target_modules": ["q_proj", "v_proj"]})
    names = [n for n, p in m.named_parameters() if "lora_" in n]
    assert len(names) == 4 * 2 * 2 and all(("q_proj" in n or "v_proj" in n) for n in names)
    assert m.text_prefix_layers == 0
    m0 = create_model("tiny", lora={"rank": 0})
    assert m0.trainable_parameters()["lora"] == 0 and m0.text_prefix_layers == 4


def test_paper_preset_from_local_stand_ins(tmp_path):
    "The paper preset's code path (hf LM from a folder, bf16, grad checkpointing, LoRA on all linear layers of every block, DINOv2 ViT-L/14 architecture) at reduced size, no download."
    tok = tiny_tokenizer()
    torch.manual_seed(0)
    tiny_lm(tok).save_pretrained(tmp_path / "llama")
    tok.save_pretrained(tmp_path / "llama")
    vision = {"pretrained": False, "depth": 1, "width": 64, "heads": 2, "img_size": 28}
    for pretrained in (True, False):
        m = create_model("paper", lm={"path": str(tmp_path / "llama"), "pretrained": pretrained}, vision=vision,
                         adapter={"heads": 2}).train()
        assert m.config.vision.timm_name == "vit_large_patch14_dinov2" and m.vision.patch_embed.patch_size == (14, 14)
        assert m.lm.dtype == torch.bfloat16 and m.text_codebook.dtype == torch.bfloat16
        assert all(l.gradient_checkpointing for l in m.lm.model.layers) and m.lora_layers == [0, 1, 2, 3]
        assert all(p.dtype == torch.float32 for n, p in m.named_parameters() if p.requires_grad)
        assert m.vocab.filter == "alpha2"
        out = m(torch.randn(2, 3, 28, 28), CAPS[:2])
        assert out["image_features"].shape == (2, m.vocab.size) and torch.isfinite(out["text_features"]).all()
        out["text_features"].sum().backward()


def test_paper_lm_missing_is_a_clear_error(tmp_path):
    with pytest.raises(Exception, match="nowhere"):
        create_model("paper", lm={"path": str(tmp_path / "nowhere")}, vision={"pretrained": False, "depth": 1})


# ---------------------------------------------------------------- save / load, explanations

@pytest.mark.parametrize("variant", ["lexvla", "dense"])
def test_save_load_gives_identical_vectors(tmp_path, variant):
    m = create_model("tiny", seed=5, variant=variant, vision={"frozen": False})
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad: p.add_(0.01 * torch.randn_like(p))
    m.eval()
    with torch.no_grad(): a = m(pixels(), CAPS)
    assert save_trained(m, tmp_path) == tmp_path
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.json", "weights.safetensors"]  # no pickles
    rec = json.loads((tmp_path / "model.json").read_text())
    assert (rec["variant"], rec["seed"], rec["vocab_fingerprint"]) == (variant, 5, m.vocab.fingerprint())
    assert rec["model"]["vision"]["frozen"] is False and rec["model"]["preset"] == "tiny"
    with safetensors.torch.safe_open(str(tmp_path / "weights.safetensors"), "pt") as f:
        assert f.metadata() == {"variant": variant}
        assert set(f.keys()) == {n for n, p in m.named_parameters() if p.requires_grad}
    m2 = load_trained(tmp_path)
    assert m2.variant == variant and m2.seed == 5 and not m2.training
    with torch.no_grad(): b = m2(pixels(), CAPS)
    for k in ("image_features", "text_features"):
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


def test_load_trained_refuses_broken_folders(tmp_path):
    "Missing files, weights the model lacks or lacks of it, another vocabulary: errors that name the folder."
    ok = save_trained(create_model("tiny"), tmp_path / "ok")
    weights = safetensors.torch.load_file(str(ok / "weights.safetensors"))

    def broken(name, weights=None, model_json=None, drop=None):
        d = tmp_path / name
        shutil.copytree(ok, d)
        if weights is not None: safetensors.torch.save_file(weights, str(d / "weights.safetensors"))
        if model_json is not None: (d / "model.json").write_text(json.dumps(model_json))
        if drop is not None: (d / drop).unlink()
        return d

    with pytest.raises(ValueError, match=r"extra: weights this model does not have: \['nope'\]"):
        load_trained(broken("extra", weights={**weights, "nope": torch.zeros(1)}))
    with pytest.raises(ValueError, match=r"lost: trained weights missing: \['visual_codebook'\]"):
        load_trained(broken("lost", weights={k: v for k, v in weights.items() if k != "visual_codebook"}))
    rec = json.loads((ok / "model.json").read_text())
    with pytest.raises(ValueError, match="vocab: the tokenizer now gives another vocabulary"):
        load_trained(broken("vocab", model_json={**rec, "vocab_fingerprint": "0" * 64}))
    for f in ("model.json", "weights.safetensors"):
        with pytest.raises(FileNotFoundError, match=rf"{f}: missing.*run `dvc repro train`"):
            load_trained(broken(f"no-{f}", drop=f))


def test_explain_sums_to_the_score(tiny):
    with torch.no_grad():
        out = tiny(pixels(1), CAPS[:1])
    i, t = out["image_features"][0], out["text_features"][0]
    parts = tiny.explain(i, t, k=tiny.vocab.size)
    assert math.isclose(sum(c for _, c in parts), float(tiny.similarity(i[None], t[None])), rel_tol=1e-4)
    top = tiny.explain(i, t, k=3)
    assert [w for w, _ in top] == [w for w, _ in parts[:3]] and top[0][1] >= top[1][1] >= top[2][1]
    words = tiny.top_words(t, k=4)
    assert len(words) == 4 and words[0][0] == tiny.vocab.word(int(t.argmax()))


# ---------------------------------------------------------------- the embedded text tower (SmolLM2-135M)

@pytest.mark.repro
def test_embedded_text_tower_in_context_lexical_prediction(tiny_repro):
    "SmolLM2-135M's last-token prediction already names the caption's words (method §2); split == full on the real LM."
    models = tiny_repro["a"] / "models"  # the convert stage's LM and ViT, from the end-to-end run
    m = create_model("embedded", lm={"converted": str(models / "lm")},
                     vision={"checkpoint": str(models / "vision" / "model.safetensors")}).eval()
    assert m.vision.patch_embed.grid_size == (8, 8) and not any(p.requires_grad for p in m.vision.parameters())
    assert m.vocab.size == 21504 and m.n_layers == 30 and m.text_prefix_layers == 28 and m.lora_layers == [28, 29]
    caps = ["a crimson ring above a green square", "two small red circles left of a blue star"]
    with torch.no_grad():
        full = m.encode_text(caps)
        h, mask = m.text_prefix(m.tokenize(caps))
        torch.testing.assert_close(m.encode_text_from_prefix(h, mask), full, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(m.encode_text(caps[:1]), full[:1], rtol=1e-4, atol=1e-5)
        tok = m.tokenize(caps)
        logits = m.lm(**tok, position_ids=positions_from_mask(tok["attention_mask"])).logits[:, -1]
        torch.testing.assert_close(m.text_logits_from_prefix(h, mask), logits[:, m.vocab.ids], rtol=1e-4, atol=1e-3)
    top = [w for w, _ in m.top_words(full[0], k=10)]
    assert {"red", "green", "ring"} <= set(top), top
    top2 = [w for w, _ in m.top_words(full[1], k=10)]
    assert {"red", "blue", "star"} <= set(top2), top2


def test_stale_converted_lm_is_refused(tmp_path):
    """Issue 34: the convert stage's folder (`model.lm.converted`) stands in for the GGUF only when the params ask for
    a GGUF and its source.json records that GGUF; an LM swapped in the params never loads the old copy silently."""
    tok = tiny_tokenizer()
    conv = tmp_path / "lm"  # a converted folder as the convert stage leaves it, but of another GGUF
    tiny_lm(tok).save_pretrained(conv)
    tok.save_pretrained(conv)
    (conv / "source.json").write_text(json.dumps({"gguf": "Other-1B.Q4_0.gguf", "bytes": 123, "max_logit_diff": 0.0}))
    gguf = dataclasses.replace(model_config("embedded").lm, converted=str(conv))
    msg = (rf"model.lm.converted: {re.escape(str(conv))} holds Other-1B.Q4_0.gguf \(123 bytes\).*"
           rf"asks for {re.escape(SMOLLM2_GGUF)}")
    with pytest.raises(ParamsError, match=msg): lm_location(gguf)
    with pytest.raises(ParamsError, match=msg):
        create_model("embedded", lm={"converted": str(conv)}, vision={"pretrained": False, "depth": 1})
    # source hf: its own path (here a copy of the tiny Llama), never the converted folder
    shutil.copytree(conv, tmp_path / "llama")
    assert lm_location(dataclasses.replace(gguf, source="hf", path=str(tmp_path / "llama"))) == (
        str(tmp_path / "llama"), {})
    # the recorded GGUF is the one asked for (the default pipeline): the converted folder
    (conv / "source.json").write_text(json.dumps({"gguf": SMOLLM2_GGUF, "bytes": smollm2_gguf().stat().st_size}))
    assert lm_location(gguf) == (str(conv), {})
    (conv / "source.json").unlink()  # a folder that records no source: refused too
    with pytest.raises(ParamsError, match="no recorded GGUF source"): lm_location(gguf)
