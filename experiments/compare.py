"""Compare the final points of several convergence results folders (issue 32): one table across the ablations, the λ
sweep points and the levers, each row with the params it changed, and a sparsity-recall plot.

    .venv/bin/python experiments/compare.py experiments/convergence/pictograms_h300 experiments/levers/* \
        --out experiments/levers/compare.md --plot experiments/levers/compare.png --json experiments/levers/compare.json

Each folder is one `experiments/convergence.py` results folder (its `results.json`). A row is one variant's **last**
val point on one evaluated set: R@1 both ways and their mean, active words per image (per caption) at 1/sqrt(V),
R@1 at top-256, the top-20 words' share of the mass, PatchDis, the most-activated words and those of them that occur in
no training or val caption (junk, or a caption word's relative), and the levers (`--set`) that run changed. Rows are
ordered by set, then horizon, then mean R@1. The plot puts mean R@1 against active words per image, one panel per
set: a sparsity-recall reading of the λ points next to the unpenalised model.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def default_lambda(params_file: Path = ROOT / "params.yaml") -> float:
    "The image regulariser weight every variant uses unless a lever or the variant's own `lam` changes it."
    return float(yaml.safe_load(params_file.read_text())["train"]["lambda_img"])


def lam_of(variant: str, levers: list[str], lam0: float) -> float | None:
    "The λ a run trained with: 0 for an unpenalised variant, a `train.lambda_img` lever, else the default."
    if variant in ("nopenalty", "dense"): return 0.0 if variant == "nopenalty" else None
    for a in levers:
        key, _, val = a.partition("=")
        if key == "train.lambda_img": return float(yaml.safe_load(val))
    return lam0


def caption_words(files: list[Path]) -> set[str]:
    "Every lower-case word of the captions in these text-cache `captions.json` files (missing files are skipped)."
    caps = [c for f in files if f.is_file() for c in json.loads(f.read_text())["captions"]]
    return {w for c in caps for w in re.findall(r"[a-z]+", c.lower())}


def default_caption_files(es: str) -> list[Path]:
    "The training captions and the val captions of set `es` (the default's text cache and the experiments' val cache)."
    return [ROOT / "data" / "textcache" / "train" / "captions.json",
            ROOT / "experiments" / "convergence" / "cache" / "text" / "eval" / es / "captions.json"]


def rows(folders: list[Path], lam0: float, vocab=default_caption_files) -> list[dict]:
    """One row per (folder, variant, set): the variant's last val point, its levers and its λ, and which of its 20
    most-activated words occur in no training caption and no val caption of the set (`vocab(set)`: caption files)."""
    out, known = [], {}
    for folder in folders:
        f = folder / "results.json"
        if not f.is_file():  # a glob also names cache folders: skipped, and said
            print(f"{folder}: no results.json, skipped", file=sys.stderr)
            continue
        rec = json.loads(f.read_text())
        for es, sub in (rec.get("sets") or {}).items():
            for v, curve in sub["curves"].items():
                if not curve: continue
                c, prov = curve[-1], (sub.get("provenance") or {}).get(v) or {}
                levers = prov.get("levers") or []
                out.append({"folder": str(folder), "variant": v, "set": es, "steps": rec["steps"], "step": c["step"],
                            "levers": levers, "lam": lam_of(v, levers, lam0), "precision": prov.get("precision"),
                            **{k: c.get(k) for k in ("i2t_R@1", "t2i_R@1", "mean_R@1", "image_active_words",
                                                     "text_active_words", "top256_R@1", "top20_mass_share",
                                                     "patchdis_mIoU", "top20_words")}})
                if es not in known: known[es] = caption_words(vocab(es))
                words = known[es]
                top = c.get("top20_words")
                out[-1]["off_caption"] = [w for w in top if w not in words] if words and top else None
    if not out: raise SystemExit(f"no results.json in {', '.join(map(str, folders))} (run experiments/convergence.py)")
    return sorted(out, key=lambda r: (r["set"], r["steps"], -(r["mean_R@1"] or 0.0)))


def markdown(rs: list[dict], n_words: int = 8) -> str:
    "The table, one section per evaluated set."
    f = lambda v, d=3: "-" if v is None else f"{v:.{d}f}"
    md = []
    for es in dict.fromkeys(r["set"] for r in rs):
        md += [f"## Set `{es}` (val, each run's last point)", "",
               "| folder | variant | λ | levers | step | i->t / t->i R@1 | mean | active words / image (caption) | "
               "top-256 R@1 | top-20 share | PatchDis | most-activated words | of the top 20, in no caption |",
               "|---" * 13 + "|"]
        for r in (r for r in rs if r["set"] == es):
            aw = "-" if r["image_active_words"] is None else \
                f"{r['image_active_words']:,.0f} ({r['text_active_words']:,.0f})"
            top = "-" if r["top256_R@1"] is None else " / ".join(f(x) for x in r["top256_R@1"])
            lev = ", ".join(f"`{a}`" for a in r["levers"] if not a.startswith("train.lambda_")) or "none"
            lam = "-" if r["lam"] is None else f"{r['lam']:g}"
            off = "-" if r["off_caption"] is None else f"{len(r['off_caption'])}: {', '.join(r['off_caption'])}"
            md.append(f"| {Path(r['folder']).name} | {r['variant']} | {lam} | "
                      f"{lev} | {r['step']} | {f(r['i2t_R@1'])} / {f(r['t2i_R@1'])} | {f(r['mean_R@1'])} | {aw} | "
                      f"{top} | "
                      f"{f(r['top20_mass_share'])} | {f(r['patchdis_mIoU'])} | "
                      f"{', '.join((r['top20_words'] or [])[:n_words]) or '-'} | {off} |")
        md.append("")
    return "\n".join(md)


def plot(rs: list[dict], path: Path) -> None:
    "Mean R@1 against active words per image, one panel per set; each point labelled by variant and λ."
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    sets = list(dict.fromkeys(r["set"] for r in rs))
    fig, axes = plt.subplots(1, len(sets), figsize=(6 * len(sets), 4.5), squeeze=False)
    for ax, es in zip(axes[0], sets):
        for r in (r for r in rs if r["set"] == es and r["image_active_words"] is not None):
            lab = f"{r['variant']} λ={r['lam']:g}" if r["lam"] is not None else r["variant"]
            other = [a for a in r["levers"] if not a.startswith("train.lambda_")]
            if other: lab += " " + ",".join(a.split("=")[0].split(".")[-1] for a in other)
            ax.scatter(r["image_active_words"], r["mean_R@1"])
            ax.annotate(f"{lab} ({r['step']})", (r["image_active_words"], r["mean_R@1"]), fontsize=7,
                        xytext=(3, 3), textcoords="offset points")
        curves = {}  # each penalty's λ points (no other lever) joined in λ order, with the λ = 0 run at their start
        pts = [r for r in rs if r["set"] == es and r["image_active_words"] is not None and r["lam"] is not None
               and r["variant"] != "bow" and all(a.startswith("train.lambda_") for a in r["levers"])]
        penalised = {r["variant"] for r in pts if r["lam"]}
        for r in pts:
            for v in ([r["variant"]] if r["lam"] else sorted(penalised)): curves.setdefault(v, []).append(r)
        for v, pts in curves.items():
            if len(pts) < 2: continue
            pts = sorted(pts, key=lambda r: r["lam"])
            lams = ", ".join(f"{r['lam']:g}" for r in pts)
            ax.plot([r["image_active_words"] for r in pts], [r["mean_R@1"] for r in pts], "-", lw=0.8, alpha=0.6,
                    label=f"{v}: λ = {lams}")
        if curves: ax.legend(fontsize=7)
        ax.set_xscale("log"); ax.grid(alpha=.3)
        ax.set_xlabel("active words per image at 1/sqrt(V) (val)"); ax.set_ylabel("mean R@1 (val)")
        ax.set_title(f"{es}: sparsity against recall")
    fig.tight_layout(); fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folders", nargs="+", help="convergence results folders (each with results.json)")
    ap.add_argument("--out", default="", help="write the table here (markdown) as well as printing it")
    ap.add_argument("--plot", default="", help="write the sparsity-recall plot here (png)")
    ap.add_argument("--json", default="",
                    help="write the rows here ({'rows': [...]}): the record the report stage puts in summary.md")
    a = ap.parse_args(argv)
    rs = rows([Path(p) for p in a.folders], default_lambda())
    md = markdown(rs)
    print(md)
    if a.out: Path(a.out).write_text(md + "\n")
    if a.plot: plot(rs, Path(a.plot))
    if a.json: Path(a.json).write_text(json.dumps({"rows": rs}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
