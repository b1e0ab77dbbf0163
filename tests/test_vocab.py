"""Vocabulary merges (issue: alpha2 keeps "▁the" and "the"): explanations list each readable word once (fast)."""
import base64
import importlib.util
import struct
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models
from transformers import PreTrainedTokenizerFast

from lexvla.model import LexVLA
from lexvla.vocab import FILTERS, Vocabulary, build_vocabulary

# Llama-2 style pieces: "▁the" (word start) and "the" (the continuation of "bathe") are two pieces, one word
PIECES = ["<unk>", "<s>", "</s>", "<0x0A>", "▁the", "the", "▁red", "▁ring", "ring", "▁Red", "▁a", "ing",
          "▁42"]


@pytest.fixture(scope="module")
def tok():
    t = Tokenizer(models.WordLevel({p: i for i, p in enumerate(PIECES)}, unk_token="<unk>"))
    return PreTrainedTokenizerFast(tokenizer_object=t, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def _model(vocab):
    "Just what `LexVLA.explain` and `LexVLA.top_words` read: the methods run unchanged on it."
    return SimpleNamespace(lexical=True, vocab=vocab)


def test_alpha2_keeps_both_pieces_and_lists_the_duplicates(tok):
    v = build_vocabulary(tok, "alpha2")
    assert v.words == ["the", "the", "red", "ring", "ring", "Red", "ing"]
    assert v.ids.tolist() == [4, 5, 6, 7, 8, 9, 11]  # both pieces stay entries of the lexical vector
    assert v.duplicates == {"the": [0, 1], "ring": [3, 4]}
    assert v.n_words == 5 and v.unique_words == ["the", "red", "ring", "Red", "ing"]
    assert v.index("the") == 0 and v.indices("the") == [0, 1]


def test_explain_shows_the_word_once_with_the_summed_contribution(tok):
    v = build_vocabulary(tok, "alpha2")
    img = torch.tensor([0.5, 0.4, 0.2, 0.3, 0.0, 0.1, 0.0])
    txt = torch.tensor([0.6, 0.5, 0.9, 0.2, 0.7, 0.0, 0.0])
    ex = LexVLA.explain(_model(v), img, txt, k=10)
    assert [w for w, _ in ex] == ["the", "red", "ring"]  # "ring" of text index 4 meets image 0: no contribution
    assert ex[0][1] == pytest.approx(0.5 * 0.6 + 0.4 * 0.5)
    assert sum(c for _, c in ex) == pytest.approx(float(img @ txt))  # still sums to the score
    assert LexVLA.explain(_model(v), img, txt, k=1) == ex[:1]
    top = LexVLA.top_words(_model(v), txt, k=3)
    assert top == [("the", pytest.approx(1.1)), ("ring", pytest.approx(0.9)), ("red", pytest.approx(0.9))]


def test_merge_orders_by_total_then_word_and_keeps_ties_at_the_cut():
    v = Vocabulary([1, 2, 3, 4], ["b", "a", "b", "c"], starts_word=[True, True, False, True], filter="alpha2")
    assert v.merge([0, 1, 2, 3], [0.25, 0.5, 0.25, 0.5]) == [("a", 0.5), ("b", 0.5), ("c", 0.5)]
    assert v.merge(np.array([3, 2, 0]), np.array([0.5, 0.25, 0.25]), k=1) == [("b", 0.5)]  # tie with "c": by word
    assert v.merge([1, 1], [0.5, 0.5]) == [("a", 1.0)]  # repeated indices add up too
    assert v.merge([], [], k=5) == [] and v.merge([0], [1.0], k=0) == []
    with pytest.raises(ValueError, match="2 indices but 1 values"): v.merge([0, 1], [1.0])
    with pytest.raises(IndexError, match="V=4"): v.merge([4], [1.0])


@pytest.mark.parametrize("f", [f for f in FILTERS if f != "alpha2"])
def test_word_start_filters_are_unaffected(tok, f):
    v = build_vocabulary(tok, f)
    want = {"word_start": ([4, 6, 7, 9], ["the", "red", "ring", "Red"]),
            "word_start_lower": ([4, 6, 7], ["the", "red", "ring"]),
            "words": ([4, 6, 7], ["the", "red", "ring"])}[f]  # all three are common English words
    assert (v.ids.tolist(), v.words) == want and v.duplicates == {} and v.n_words == v.size
    x = torch.rand(v.size, generator=torch.Generator().manual_seed(0)) + 0.01
    by_index = sorted(((v.word(j), float(x[j])) for j in range(v.size)), key=lambda p: -p[1])
    assert LexVLA.top_words(_model(v), x, k=v.size) == by_index  # merging changes nothing without duplicates


def _bench():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "vocab_llama2.py"
    spec = importlib.util.spec_from_file_location("vocab_llama2", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_vocab_llama2_reads_llama_tokenizer_js_and_rejects_other_tokenizers(tmp_path, tok):
    "The benchmark's loader on a miniature llama-tokenizer.js (same encoding), and its Llama check on the toy."
    pieces = ["<unk>", "<s>", "</s>", "▁", "t", "h", "e", "▁t", "he", "▁the"]
    merges = [(3, 4), (5, 6), (7, 8)]  # ▁ t -> ▁t, h e -> he, ▁t he -> ▁the
    b64 = lambda b: base64.b64encode(b).decode()
    js = tmp_path / "llama-tokenizer.js"
    js.write_text(f'const llama_vocab_base64 = "{b64(chr(10).join(pieces).encode())}"\n'
                  f'const llama_merges_binary = "{b64(struct.pack("<6H", *sum(merges, ())))}"\n')
    bench = _bench()
    t = bench.load(js)
    assert len(t) == 10 and t("the")["input_ids"] == [1, 9] and set(t.all_special_ids) == {0, 1, 2}
    assert build_vocabulary(t, "alpha2").words == ["he", "the"]
    assert any("10 pieces" in b for b in bench.check_llama(t))
    tok.save_pretrained(tmp_path / "toy")
    with pytest.raises(SystemExit, match="not Llama 2's tokenizer"):
        bench.main([str(tmp_path / "toy" / "tokenizer.json")])
