"""The λ sweep of the two sparsity regularisers (issue 10): sparsity-recall curves on the val split, and the
comparison at matched sparsity. A documented experiment outside the default `dvc repro`.

    .venv/bin/python experiments/sweep.py            # after `dvc repro prepare convert`; ~35 min on 2 CPU cores

It trains each (regulariser, λ) of the grid with every other setting of `params.yaml`, evaluates it on the **val**
split (never test: this is where λ is chosen), and writes, next to this file:
- `sweep/results.json` and `sweep/results.md`: one row per run, and recall at matched active words;
- `sweep/sweep.png`: R@1 against active words per image at 1/sqrt(V), and the top-20 words' share of the mass.
`sweep/cache/` and `sweep/runs/` are scratch (git-ignored); a killed sweep resumes where it stopped.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import yaml

from lexvla.params import params_from_dict, repo_root

HERE = Path(__file__).resolve().parent / "sweep"
# Regulariser -> λ values. Every key must be registered in `lexvla.losses.REGULARIZERS` (and listed in the params
# schema's `VariantSpec.reg`); "none" is the λ = 0 end that every penalised curve shares. A new regulariser is one
# more key here: the runs, the matched-sparsity table and the plot follow.
GRID = {"overuse": (1e-4, 3e-4, 1e-3, 3e-3), "flops": (1e-4, 3e-4, 1e-3, 3e-3), "none": (0.0,)}
SETTINGS = {"overuse": {"share": "mean"}}  # each regulariser's settings, as params.yaml's method variant gives them
BASELINE = "none"


def penalised() -> list[str]:
    "GRID's regularisers that have a λ to sweep (all but the shared λ = 0 baseline)."
    return [g for g in GRID if g != BASELINE]


def run_name(reg: str, lam: float) -> str:
    return BASELINE if reg == BASELINE else f"{reg}-{lam:g}"


def sweep_params(params_file: Path, steps: int | None) -> dict:
    "params.yaml with the val split evaluated and the grid as train.variants."
    d = yaml.safe_load(params_file.read_text())
    d["evaluate"]["split"] = "val"
    d["train"]["variants"] = {run_name(r, lam): {"model": "lexvla", "reg": r, "lam": lam,
                                                 **({"settings": SETTINGS[r]} if r in SETTINGS else {})}
                              for r, lams in GRID.items() for lam in lams}
    if steps: d["train"]["steps"] = steps
    return d


def build_caches(d: dict, data: Path, cache: Path) -> None:
    "The val split's text and image caches (the stages' own entry points), once."
    from lexvla import imagecache, textcache
    cache.mkdir(parents=True, exist_ok=True)
    pfile = cache / "params.yaml"
    pfile.write_text(yaml.safe_dump(d, sort_keys=False))
    for mod, out in ((textcache, cache / "text"), (imagecache, cache / "image")):
        # an existing cache is kept: training and evaluation check its metadata (LM, prompt, ViT weights) themselves
        if (out / "params.resolved.json").is_file(): continue
        if mod.main(["--params", str(pfile), "--data", str(data), "--out", str(out)]) != 0:
            raise SystemExit(f"{mod.__name__} failed")


def run_one(d: dict, name: str, data: Path, cache: Path) -> dict:
    "Train and evaluate one grid point (skipped when its val result exists)."
    from lexvla.evaluate import evaluate
    from lexvla.train import train
    res = HERE / "runs" / "eval" / next(iter(d["evaluate"]["sets"])) / f"{name}.json"  # <set>/<variant>.json
    if res.is_file(): return json.loads(res.read_text())
    p = params_from_dict(d, source=str(cache / "params.yaml"))
    out = HERE / "runs" / name
    train(p, name, data, cache / "text", out, out / "results", progress=True, image_cache_dir=cache / "image")
    return evaluate(p, name, out / "model", data, cache / "text", HERE / "runs" / "eval", progress=False,
                    image_cache_dir=cache / "image")


def row(name: str, reg: str, lam: float, r: dict) -> dict:
    sw = {s["name"]: s for s in r["sparsity"]}
    th = sw["threshold"]
    use = r["word_use"]["image"]
    return {"run": name, "reg": reg, "lambda": lam,
            "image_active_words": th["image_active_words"], "text_active_words": th["text_active_words"],
            "i2t_R@1": th["image_to_text_R@1"], "t2i_R@1": th["text_to_image_R@1"],
            "mean_R@1": (th["image_to_text_R@1"] + th["text_to_image_R@1"]) / 2,
            "dense_i2t_R@1": r["dense"]["image_to_text_R@1"], "dense_t2i_R@1": r["dense"]["text_to_image_R@1"],
            "top20_mass_share": use["top20_mass_share_threshold"], "top20_words": use["top20_words"][:10],
            "patchdis_mIoU": (r.get("patchdis") or {}).get("mIoU")}


def at_matched(rows: list[dict], key: str, targets: list[float]) -> dict:
    "Each regulariser's `key`, linearly interpolated in log(active words) at each target (None outside its range)."
    out = {}
    for reg in penalised():
        pts = sorted((math.log(r["image_active_words"]), r[key]) for r in rows if r["reg"] in (reg, BASELINE))
        if not pts: continue
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        out[reg] = [float(np.interp(math.log(t), xs, ys)) if xs[0] <= math.log(t) <= xs[-1] else None
                    for t in targets]
    return out


def report(rows: list[dict], steps: int) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    regs = [g for g in penalised() if any(r["reg"] == g for r in rows)]
    lo = max((min(r["image_active_words"] for r in rows if r["reg"] == g) for g in regs), default=0)
    hi = min((max(r["image_active_words"] for r in rows if r["reg"] in (g, BASELINE)) for g in regs), default=0)
    targets = [float(t) for t in np.geomspace(lo, hi, 5)] if lo < hi else []
    matched = {k: at_matched(rows, k, targets) for k in ("mean_R@1", "top20_mass_share")} if targets else {}
    HERE.mkdir(parents=True, exist_ok=True)
    (HERE / "results.json").write_text(json.dumps({"steps": steps, "split": "val", "rows": rows,
                                                   "matched_active_words": targets, "matched": matched},
                                                  indent=2) + "\n")
    md = [f"λ sweep on the val split ({steps} steps per run; every other setting as in params.yaml). "
          "Recall and active words at the 1/sqrt(V) threshold.", "",
          "| run | λ | active words / image | active words / caption | i->t R@1 | t->i R@1 | "
          "top-20 words' mass share | PatchDis mIoU | most-used words |", "|---|---|---|---|---|---|---|---|---|"]
    f = lambda v: "" if v is None else f"{v:.3f}"
    for r in rows:
        md.append(f"| {r['run']} | {r['lambda']:g} | {r['image_active_words']:.0f} | {r['text_active_words']:.0f} | "
                  f"{f(r['i2t_R@1'])} | {f(r['t2i_R@1'])} | {f(r['top20_mass_share'])} | {f(r['patchdis_mIoU'])} | "
                  f"{', '.join(r['top20_words'][:6])} |")
    if targets:
        r1, top = matched["mean_R@1"], matched["top20_mass_share"]
        md += ["", f"At matched sparsity (interpolated in log active words; `{BASELINE}` is the λ = 0 end of every "
               "curve):", "", "| active words / image | " + " | ".join(f"{g} mean R@1" for g in regs) + " | "
               + " | ".join(f"{g} top-20 share" for g in regs) + " |", "|---" * (1 + 2 * len(regs)) + "|"]
        for i, t in enumerate(targets):
            md.append(f"| {t:.0f} | " + " | ".join(f(r1[g][i]) for g in regs) + " | "
                      + " | ".join(f(top[g][i]) for g in regs) + " |")
    (HERE / "results.md").write_text("\n".join(md) + "\n")
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for i, reg in enumerate(regs):
        colour = f"C{i}"
        pts = sorted((r for r in rows if r["reg"] in (reg, BASELINE)), key=lambda r: r["image_active_words"])
        x = [r["image_active_words"] for r in pts]
        for ax, key in zip(axes, ("mean_R@1", "top20_mass_share")):
            ax.plot(x, [r[key] for r in pts], "o-", color=colour, label=reg)
            for r in pts: ax.annotate(f"{r['lambda']:g}", (r["image_active_words"], r[key]), fontsize=7,
                                      xytext=(3, 3), textcoords="offset points")
    for ax, lab in zip(axes, ("mean R@1 (i->t, t->i) at 1/sqrt(V)", "top-20 words' share of the active mass")):
        ax.set_xscale("log"); ax.set_xlabel("active words per image at 1/sqrt(V)"); ax.set_ylabel(lab)
        ax.legend(); ax.grid(alpha=.3)
    axes[0].set_title("sparsity-recall (val), labels = λ"); axes[1].set_title("concentration on overused words")
    fig.tight_layout(); fig.savefig(HERE / "sweep.png", dpi=120)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", default="params.yaml", help="the base params file")
    ap.add_argument("--steps", type=int, default=None, help="steps per run (default: train.steps)")
    ap.add_argument("--only-report", action="store_true", help="redraw the table and plot from finished runs")
    a = ap.parse_args(argv)
    root = repo_root()
    from lexvla.losses import REGULARIZERS
    unknown = sorted(set(GRID) - set(REGULARIZERS))
    if unknown: raise SystemExit(f"experiments/sweep.py: GRID names unregistered regularisers {unknown}; "
                                 f"registered: {sorted(REGULARIZERS)} (lexvla.losses.register_regularizer)")
    d = sweep_params(root / a.params, a.steps)
    data, cache = root / "data" / "prepared", HERE / "cache"
    if not a.only_report: build_caches(d, data, cache)
    rows = []
    for reg, lams in GRID.items():
        for lam in lams:
            name = run_name(reg, lam)
            done = HERE / "runs" / "eval" / next(iter(d["evaluate"]["sets"])) / f"{name}.json"
            if a.only_report and not done.is_file(): continue
            rows.append(row(name, reg, lam, run_one(d, name, data, cache)))
            print(json.dumps(rows[-1]), flush=True)
    report(rows, d["train"]["steps"])
    print(f"wrote {HERE / 'results.md'} and {HERE / 'sweep.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
