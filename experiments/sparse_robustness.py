"""Sparse robustness (issue 20 item 4): why R@1 at top-k falls short of the full vectors', and what the levers the
paper leaves open do. Post hoc, on trained models' **val** vectors (never test):

    .venv/bin/python experiments/sparse_robustness.py                  # the convergence runs' final models
    .venv/bin/python experiments/sparse_robustness.py --variants lexvla --ks 64,256

For each model it measures
- **where the mass is**: the share of each vector's squared L2 norm (its self-score) held by its top-k words, and
  the share of each matched (image, caption) score `sum_j x_j y_j` carried by words inside both top-k sets;
- **how many words carry a matched score**: the fewest words whose products reach 50 % / 90 % of it;
- **R@1 under each truncation rule** (both directions), against the full vectors:
  `both` (the paper's protocol and the evaluate stage's: both sides cut to their top-k, weights kept),
  `both+renorm` (both cut, then L2-renormalised, so a document that lost more tail is not penalised for it),
  `images` (only the stored image vectors cut: an index where queries stay full) and `captions` (only captions cut).

Writes `sparse_robustness/results.json` and `results.md` next to this file. Reads the convergence experiment's
val caches and runs (`experiments/convergence.py` first).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from convergence import machine  # noqa: E402  (one provenance line for both experiments)

HERE = Path(__file__).resolve().parent
CONV = HERE / "convergence"
OUT = HERE / "sparse_robustness"


def topk_mask(x: torch.Tensor, k: int) -> torch.Tensor:
    "(n, V) boolean mask of each row's k largest entries (ties broken by torch.topk)."
    m = torch.zeros_like(x, dtype=torch.bool)
    return m.scatter_(1, x.topk(min(k, x.shape[1]), dim=1).indices, True)


def cut(x: torch.Tensor, k: int | None, renorm: bool = False) -> torch.Tensor:
    "Rows cut to their top-k (None: unchanged), optionally L2-renormalised."
    if k is None: return x
    y = x * topk_mask(x, k)
    return torch.nn.functional.normalize(y, dim=1) if renorm else y


def r_at_1(img: torch.Tensor, txt: torch.Tensor, t2i: torch.Tensor) -> tuple[float, float]:
    "(image->text, text->image) R@1; an image's hit is any of its captions; ties pessimistic (lowest index wins)."
    from lexvla.metrics import retrieval_metrics
    m = retrieval_metrics(img @ txt.T, t2i, ks=(1,))
    return m["image_to_text_R@1"], m["text_to_image_R@1"]


def words_for_share(prod: torch.Tensor, share: float) -> torch.Tensor:
    "(n,) fewest words whose (non-negative) products reach `share` of each row's sum."
    s = prod.sort(dim=1, descending=True).values.cumsum(1)
    return (s < share * s[:, -1:]).sum(1) + 1


def word_groups(words: list[str]) -> dict[str, torch.Tensor]:
    "(V,) masks of the vocabulary's words the scene captions use: shapes (with plurals and synonyms), colours, any."
    from lexvla.scenes import COLOURS, PLURALS, SHAPE_SYNONYMS, SHAPES, vocabulary
    shape = set(SHAPES) | set(PLURALS.values()) | {w for v in SHAPE_SYNONYMS.values() for w in v}
    colour = {w for _, syn in COLOURS.values() for w in syn}
    key = [w.strip().lower() for w in words]
    return {n: torch.tensor([w in g for w in key]) for n, g in
            (("shape", shape), ("colour", colour), ("caption_grammar", set(vocabulary())))}


def analyse(img: torch.Tensor, txt: torch.Tensor, t2i: torch.Tensor, ks: list[int],
            words: list[str] | None = None) -> dict:
    "Mass concentration, words per matched score, what kind of word carries it, and R@1 under each truncation rule."
    img, txt = img.float(), txt.float()
    pair = img[t2i] * txt  # (captions, V): each matched pair's per-word products
    out = {"full_R@1": r_at_1(img, txt, t2i),
           "matched_score_words": {f"{int(s * 100)}%": float(words_for_share(pair, s).float().median())
                                   for s in (0.5, 0.9)},
           "rows": []}
    if words is not None:  # the share of the matched scores each group of words carries (the rest: other words)
        out["matched_score_by_group"] = {n: float(pair[:, m].sum() / pair.sum().clamp_min(1e-30))
                                         for n, m in word_groups(words).items()}
    for k in ks:
        mi, mt = topk_mask(img, k), topk_mask(txt, k)
        row = {"k": k,
               "image_self_share": float(((img * mi) ** 2).sum(1).mean() / (img ** 2).sum(1).mean()),
               "caption_self_share": float(((txt * mt) ** 2).sum(1).mean() / (txt ** 2).sum(1).mean()),
               "matched_score_share": float((pair * (mi[t2i] & mt)).sum() / pair.sum().clamp_min(1e-30))}
        for name, (a, b) in {"both": (cut(img, k), cut(txt, k)),
                             "both+renorm": (cut(img, k, True), cut(txt, k, True)),
                             "images": (cut(img, k), txt), "captions": (img, cut(txt, k))}.items():
            r = r_at_1(a, b, t2i)
            row[name] = {"R@1": r, "share_of_full": [r[0] / max(out["full_R@1"][0], 1e-9),
                                                     r[1] / max(out["full_R@1"][1], 1e-9)]}
        out["rows"].append(row)
    return out


def val_vectors(name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[str]]:
    "A convergence run's final model's val vectors (images, captions), each caption's image, and the vocabulary."
    from lexvla.caches import ImageTokenCache, TextPrefixCache
    from lexvla.transforms import image_transform
    from lexvla.datasets import load_split
    from lexvla.model import load_trained
    from lexvla.params import repo_root
    from lexvla.vectors import encode_images, encode_texts
    model = load_trained(CONV / "runs" / name / "model", "cpu")
    split = load_split(repo_root() / "data" / "prepared", "val", 0)
    icache = ImageTokenCache.load(CONV / "cache" / "image" / "eval" / "embedded", "val")  # eval/<set>
    tcache = TextPrefixCache.load(CONV / "cache" / "text" / "eval" / "embedded")
    with torch.no_grad():
        img = encode_images(model, split.images, image_transform(model.data_config, train=False), 64, progress=False,
                            cache=icache)
        txt = encode_texts(model, split.captions, 64, tcache, progress=False)
    if not model.lexical: raise SystemExit(f"{name}: not a lexical model")
    return img, txt, torch.as_tensor(split.txt2img, dtype=torch.long), list(model.vocab.words)


def report(rec: dict) -> None:
    "results.json and results.md."
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "results.json").write_text(json.dumps(rec, indent=1) + "\n")
    f2 = lambda p: f"{p[0]:.3f} / {p[1]:.3f}"
    md = [f"Sparse robustness on the **val** split ({rec['machine']}): the convergence runs' final models "
          f"({rec['steps']} steps). R@1 as i->t / t->i; 'share' is R@1 under the rule over the full vectors' R@1.", "",
          "| variant | full R@1 | words carrying 50 % / 90 % of a matched score (median) | share of the matched scores "
          "carried by shape / colour / any caption words (rest: words no caption uses) |", "|---|---|---|---|"]
    for v, a in rec["variants"].items():
        w, g = a["matched_score_words"], a.get("matched_score_by_group") or {}
        gs = " / ".join(f"{g[n]:.3f}" for n in ("shape", "colour", "caption_grammar")) if g else "-"
        md.append(f"| {v} | {f2(a['full_R@1'])} | {w['50%']:.0f} / {w['90%']:.0f} | {gs} |")
    md += ["", "| variant | k | image self-score in top-k | caption self-score in top-k | matched score in both top-k "
           "| both (paper) share | both+renorm share | images-only share | captions-only share |",
           "|---|---|---|---|---|---|---|---|---|"]
    for v, a in rec["variants"].items():
        for r in a["rows"]:
            md.append(f"| {v} | {r['k']} | {r['image_self_share']:.3f} | {r['caption_self_share']:.3f} | "
                      f"{r['matched_score_share']:.3f} | " + " | ".join(f2(r[n]["share_of_full"]) for n in
                                                                       ("both", "both+renorm", "images", "captions"))
                      + " |")
    (OUT / "results.md").write_text("\n".join(md) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variants", default="lexvla,flops,nopenalty,bow", help="convergence runs (lexical ones)")
    ap.add_argument("--ks", default="64,256,1024", help="top-k settings")
    a = ap.parse_args(argv)
    ks = [int(k) for k in a.ks.split(",")]
    conv = json.loads((CONV / "results.json").read_text())
    rec = {"machine": machine(), "steps": conv["steps"], "split": "val", "variants": {}}
    for name in [v.strip() for v in a.variants.split(",") if v.strip()]:
        if not (CONV / "runs" / name / "model" / "model.json").is_file():
            print(f"{name}: no finished convergence run, skipped", file=sys.stderr); continue
        img, txt, t2i, words = val_vectors(name)
        rec["variants"][name] = analyse(img, txt, t2i, ks, words)
        print(name, json.dumps(rec["variants"][name]["rows"][-1]), flush=True)
    report(rec)
    print(f"wrote {OUT / 'results.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
