"""The convergence experiment (issue 20): train each variant far past the earlier 120-step default, evaluate on
**val** at several points of each run, apply a plateau rule, then decide the paper's claims on **test** with
paired-bootstrap intervals. A documented experiment outside the default `dvc repro`.

    .venv/bin/python experiments/convergence.py                       # after `dvc repro imagecache textcache`
    .venv/bin/python experiments/convergence.py --variants lexvla,dense --steps 1200 --eval-every 200
    .venv/bin/python experiments/convergence.py --only-report         # redraw from the finished points
    .venv/bin/python experiments/convergence.py --variants lexvla --steps 300 --out experiments/convergence/h300

Every setting but the ones below is params.yaml's (the embedded default's data, towers, batch, lr, λ):
- `train.steps` = `--steps` (the cosine schedule's horizon), checkpoints at every evaluation point;
- each run is trained in segments (`train(..., stop_after=point)`): a segment resumes the previous one exactly, so
  the curve's points are the states of one run, not separate shorter runs;
- val evaluation at each point (R@1 both ways, active words at 1/sqrt(V), R@1 at top-64 / top-256, the top-20 words'
  share, PatchDis); `evaluate.topks` is cut to (64, 256) to keep an evaluation near a minute.
Plateau rule: a run has reached its plateau when the last third of its steps gained less than `--plateau-gain`
(0.005) mean R@1 (the mean of image->text and text->image) on val. With a cosine schedule the last third runs at a
small learning rate, so a run that passes the rule is converged *for that horizon*; one that fails it needs a
longer horizon, and says so in the table.
Each finished run is evaluated once on **test**, and the claims (`report.paper_claims`) get their intervals there.

Writes next to this file: `convergence/results.json` (the rule, each variant's curve and plateau, the test claims,
the machine and wall times), `convergence/results.md` and `convergence/curves.png`. `convergence/cache/` and
`convergence/runs/` are scratch (git-ignored); a killed run resumes at its last checkpoint, and finished points are
never evaluated twice.
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from pathlib import Path

import yaml

from lexvla.params import params_from_dict, repo_root

HERE = Path(__file__).resolve().parent / "convergence"  # the results folder (`--out` moves it)
CACHE = HERE / "cache"  # the val caches, shared by every results folder (`--caches`: a lever's own)
OWN_CACHES = False  # `--caches` given: CACHE also holds the training captions' text cache (a prompt or LM lever)
MEAN_SHARE = {"share": "mean"}  # the overuse regulariser's setting in params.yaml's method variant
VARIANTS = {"lexvla": {"model": "lexvla", "reg": "overuse", "lam": None, "settings": MEAN_SHARE},
            "dense": {"model": "dense", "reg": "none", "lam": None},
            "flops": {"model": "lexvla", "reg": "flops", "lam": None},
            "bow": {"model": "bow", "reg": "overuse", "lam": None, "settings": MEAN_SHARE},
            "nopenalty": {"model": "lexvla", "reg": "none", "lam": 0.0}}


def machine() -> str:
    "The CPU this ran on, in words (for the results' provenance: machines differ by up to 2x)."
    import os
    name = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                 if ln.startswith("model name")), platform.processor() or platform.machine()) \
        if Path("/proc/cpuinfo").is_file() else platform.processor() or platform.machine()
    return f"{name}, {os.cpu_count()} cores"


def commit() -> str:
    "The repository's commit (short), '+dirty' when the work tree has changes."
    import subprocess
    run = lambda *a: subprocess.run(["git", *a], capture_output=True, text=True, cwd=repo_root()).stdout.strip()
    dirty = run("status", "--porcelain", "--untracked-files=no")
    return run("rev-parse", "--short", "HEAD") + ("+dirty" if dirty else "")


def effective_precision(d: dict) -> str:
    "What `train.precision` trains in on this machine (bf16 falls back to fp32 on CPUs without native bf16)."
    from lexvla.runtime import resolve_device
    from lexvla.trainstep import mixed_precision
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mp = mixed_precision(d["train"]["precision"], resolve_device(d["base"]["device"]))
    return "fp32" if mp == "no" else mp


def set_key(d: dict, assignment: str) -> dict:
    "Apply `--set a.b.c=VALUE` (VALUE as YAML, else as text) to `d`; a partial `model` map merges over the preset."
    key, sep, raw = assignment.partition("=")
    if not sep or not key: raise SystemExit(f"--set {assignment!r}: expected KEY=VALUE, e.g. model.vocab.filter=words")
    *path, last = key.split(".")
    node = d
    for k in path: node = node.setdefault(k, {})
    try: value = yaml.safe_load(raw)
    except yaml.YAMLError: value = raw  # not YAML (a prompt with quotes and a colon): the text itself
    if isinstance(value, str):  # YAML 1.1 reads 1e-2 (no dot) as text: a number written so is the number
        try: value = float(value)
        except ValueError: pass
    node[last] = value
    return d


def experiment_params(params_file: Path, variants: list[str], steps: int, eval_every: int, split: str,
                      sets: list[str] = ()) -> dict:
    "params.yaml with the experiment's variants, horizon, checkpoints at the evaluation points, and `split` evaluated."
    d = yaml.safe_load(params_file.read_text())
    d["train"]["variants"] = {v: copy.deepcopy(VARIANTS[v]) for v in variants}
    for a in sets: set_key(d, a)  # after the variants: a lever may change one (train.variants.lexvla.settings.share)
    d["train"]["steps"] = steps
    d["train"]["checkpoint_every"] = eval_every
    d["evaluate"]["split"] = split
    d["evaluate"]["topks"] = [64, 256]
    return d


def points(steps: int, eval_every: int) -> list[int]:
    "The evaluation points of a run: every `eval_every` steps, and the last step."
    return sorted({*range(eval_every, steps + 1, eval_every), steps})


def eval_set(d: dict) -> str:
    "The first evaluated set of evaluate.sets (the one the figures and the old single-set records use)."
    return next(iter(d["evaluate"]["sets"]))


def eval_sets(d: dict) -> list[str]:
    "Every evaluated set of evaluate.sets: each point is evaluated on each (the default's `seen` and `unseen`)."
    return list(d["evaluate"]["sets"])


def build_val_caches(d: dict, data: Path, cache: Path, train_text: bool = False) -> None:
    """The val split's text and image caches (the eval part of each cache stage), once; `train_text`: also the training
    captions' text cache (`--caches`: a lever that changes the prompt or the LM cannot use data/textcache)."""
    from lexvla import imagecache, textcache
    cache.mkdir(parents=True, exist_ok=True)
    pfile = cache / "params.yaml"
    pfile.write_text(yaml.safe_dump(d, sort_keys=False))
    for mod, out in ((textcache, cache / "text"), (imagecache, cache / "image")):
        if all((out / "eval" / es / "params.resolved.json").is_file() for es in eval_sets(d)): continue
        if mod.main(["--params", str(pfile), "--data", str(data), "--out", str(out), "--part", "eval"]) != 0:
            raise SystemExit(f"{mod.__name__} failed")
    if train_text and not (cache / "text" / "train" / "params.resolved.json").is_file():
        if textcache.main(["--params", str(pfile), "--data", str(data), "--out", str(cache / "text"),
                           "--part", "train"]) != 0:
            raise SystemExit("textcache (train part) failed")


def train_text_cache() -> Path:
    "The folder whose `train/` holds the training captions' text cache: data/textcache, or `--caches`' own."
    return CACHE / "text" if OWN_CACHES else repo_root() / "data" / "textcache"


def curve_row(step: int, r: dict, wall_s: float | None) -> dict:
    "One evaluation point: the numbers the curves and the plateau rule read."
    row = {"step": step, "i2t_R@1": r["dense"]["image_to_text_R@1"], "t2i_R@1": r["dense"]["text_to_image_R@1"],
           "wall_s": wall_s}
    row["mean_R@1"] = (row["i2t_R@1"] + row["t2i_R@1"]) / 2
    sweep = {s["name"]: s for s in r.get("sparsity") or []}
    if "threshold" in sweep:
        row["image_active_words"] = sweep["threshold"]["image_active_words"]
        row["text_active_words"] = sweep["threshold"]["text_active_words"]
    for k in (64, 256):
        s = sweep.get(f"top{k}")
        if s: row[f"top{k}_R@1"] = [s["image_to_text_R@1"], s["text_to_image_R@1"]]
    use = (r.get("word_use") or {}).get("image")
    if use: row["top20_mass_share"], row["top20_words"] = use["top20_mass_share_threshold"], use["top20_words"]
    row["patchdis_mIoU"] = (r.get("patchdis") or {}).get("mIoU")
    return row


def plateau(curve: list[dict], gain: float) -> dict:
    "The plateau rule on a curve: the mean R@1 gained over the last third of the steps, and whether it is < gain."
    if len(curve) < 3: return {"reached": False, "why": "fewer than 3 evaluation points"}
    last = curve[-1]
    start = last["step"] * 2 / 3
    ref = max((c for c in curve if c["step"] <= start), key=lambda c: c["step"], default=curve[0])
    g = last["mean_R@1"] - ref["mean_R@1"]
    return {"reached": g < gain, "gain_last_third": g, "from_step": ref["step"], "to_step": last["step"],
            "i2t_R@1": last["i2t_R@1"], "t2i_R@1": last["t2i_R@1"], "mean_R@1": last["mean_R@1"]}


def _train_s(name: str, pt: int) -> float | None:
    "Training seconds of the segment ending at `pt` (scratch record; None when it was not timed)."
    f = HERE / "runs" / "wall" / f"{name}-{pt:05d}.json"
    return json.loads(f.read_text())["train_s"] if f.is_file() else None


def run_variant(d: dict, name: str, data: Path, steps: int, eval_every: int, progress: bool) -> dict[str, list]:
    "Train `name` point by point (resuming), evaluate each point on val of every set: `{set: curve}`."
    from lexvla.evaluate import evaluate
    from lexvla.train import train
    p = params_from_dict(d, source=str(CACHE / "params.yaml"))
    out, root = HERE / "runs" / name, repo_root()
    curves = {es: [] for es in eval_sets(d)}
    for pt in points(steps, eval_every):
        folder = HERE / "runs" / "val" / f"step-{pt:05d}"
        timing = HERE / "runs" / "wall" / f"{name}-{pt:05d}.json"
        if not timing.is_file():  # written after the point's last evaluation: a killed point is trained again
            t0 = time.perf_counter()
            train(p, name, data, train_text_cache(), out, out / "results", progress=progress,
                  image_cache_dir=root / "data" / "imagecache", stop_after=pt)
            t1 = time.perf_counter()
            for es in eval_sets(d):
                evaluate(p, name, out / "model", data, CACHE / "text", folder, progress=False,
                         image_cache_dir=CACHE / "image", eval_set=es)
            timing.parent.mkdir(parents=True, exist_ok=True)
            timing.write_text(json.dumps({"train_s": t1 - t0, "eval_s": time.perf_counter() - t1}))
        for es, curve in curves.items():
            curve.append(curve_row(pt, json.loads((folder / es / f"{name}.json").read_text()), _train_s(name, pt)))
            print(json.dumps({"variant": name, "set": es,
                              **{k: v for k, v in curve[-1].items() if k != "top20_words"}}), flush=True)
    return curves


def test_claims(d: dict, names: list[str], data: Path, topk: int = 256, es: str | None = None) -> list[dict]:
    "Each finished run's final model on test of set `es` (the default's eval caches), then the claims' intervals."
    from lexvla.evaluate import evaluate
    from lexvla.report import paper_claims
    root = repo_root()
    dt = {**d, "evaluate": {**d["evaluate"], "split": "test"}}
    p = params_from_dict(dt, source=str(CACHE / "params.yaml"))
    out = HERE / "runs" / "test"
    runs, es = {}, es or eval_set(d)
    for name in names:
        f = out / es / f"{name}.json"
        if not f.is_file():
            evaluate(p, name, HERE / "runs" / name / "model", data, root / "data" / "textcache", out, progress=False,
                     image_cache_dir=root / "data" / "imagecache", eval_set=es)
        runs[name] = json.loads(f.read_text())
    return paper_claims(out / es, runs, topk), runs


def _set_lines(es: str, sub: dict) -> list[str]:
    "One evaluated set's section: the curves, the plateaus and the test claims."
    f = lambda v: "" if v is None else f"{v:.3f}"
    md = [f"## Set `{es}`", "", "| variant | step | i->t R@1 | t->i R@1 | active words / image (caption) | "
          "top-64 R@1 | top-256 R@1 | top-20 share | PatchDis | train s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for v, curve in sub["curves"].items():
        for c in curve:
            aw = (f"{c['image_active_words']:.0f} ({c['text_active_words']:.0f})" if "image_active_words" in c else "-")
            tk = {k: " / ".join(f(x) for x in c[k]) if k in c else "-" for k in ("top64_R@1", "top256_R@1")}
            md.append(f"| {v} | {c['step']} | {f(c['i2t_R@1'])} | {f(c['t2i_R@1'])} | {aw} | {tk['top64_R@1']} | "
                      f"{tk['top256_R@1']} | {f(c.get('top20_mass_share'))} | {f(c.get('patchdis_mIoU'))} | "
                      f"{'' if c.get('wall_s') is None else round(c['wall_s'])} |")
    md += ["", "| variant | plateau reached | mean R@1 gained over the last third | plateau i->t / t->i R@1 |",
           "|---|---|---|---|"]
    for v, pl in sub["plateaus"].items():
        reached = f"not tested ({pl['why']})" if "why" in pl else "yes" if pl.get("reached") else "no"
        md.append(f"| {v} | {reached} | {f(pl.get('gain_last_third'))} | "
                  f"{f(pl.get('i2t_R@1'))} / {f(pl.get('t2i_R@1'))} |")
    if sub.get("claims"):
        md += ["", f"Claims on **test** of `{es}` ({sub['test_n_images']} images x 5 captions), final models, 95 % "
               "paired bootstrap over images:", "", "| claim | estimate | 95 % interval | verdict |",
               "|---|---|---|---|"]
        sg = lambda c: "+" if not c.get("threshold") else ""  # a difference is signed, a ratio (against 0.95) not
        md += [f"| {c['claim']} | {c['estimate']:{sg(c)}.3f} | [{c['low']:{sg(c)}.3f}, {c['high']:{sg(c)}.3f}] | "
               f"**{c['verdict']}** |" for c in sub["claims"]]
    return md + [""]


def report(rec: dict) -> None:
    "results.json, results.md and curves.png from the record (one section and one row of plots per set)."
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    HERE.mkdir(parents=True, exist_ok=True)
    (HERE / "results.json").write_text(json.dumps(rec, indent=1) + "\n")
    sets = rec.get("sets") or {"(first set)": rec}  # records before the per-set layout held one set
    prov = {v: pv for sub in sets.values() for v, pv in (sub.get("provenance") or {}).items()}
    md = [f"Convergence on the **val** split of each evaluated set ({', '.join(f'`{es}`' for es in sets)}). Horizon "
          f"{rec['steps']} steps (cosine), evaluated every {rec['eval_every']}; every other setting as in params.yaml. "
          f"Plateau rule: {rec['rule']}", "", "| variant | machine | commit | trained in | levers (params changed) |",
          "|---|---|---|---|---|",
          *(f"| {v} | {pv.get('machine', '?')} | {pv.get('commit', '?')} | {pv.get('precision', '?')} | "
            f"{', '.join(f'`{x}`' for x in pv.get('levers') or []) or 'none'} |" for v, pv in prov.items()), ""]
    for es, sub in sets.items(): md += _set_lines(es, sub)
    notes = {pv["note"]: v for v, pv in reversed(list(prov.items())) if pv.get("note")}  # each note once
    md += [ln for n in notes for ln in (n, "")]
    (HERE / "results.md").write_text("\n".join(md).rstrip() + "\n")
    fig, grid = plt.subplots(len(sets), 3, figsize=(15, 4 * len(sets)), squeeze=False)
    for axes, (es, sub) in zip(grid, sets.items()):
        for v, curve in sub["curves"].items():
            x = [c["step"] for c in curve]
            axes[0].plot(x, [c["i2t_R@1"] for c in curve], "o-", label=f"{v} i->t")
            axes[0].plot(x, [c["t2i_R@1"] for c in curve], "s--", label=f"{v} t->i")
            if "top256_R@1" in curve[0]:
                axes[1].plot(x, [c["top256_R@1"][0] / max(c["i2t_R@1"], 1e-9) for c in curve], "o-", label=f"{v} i->t")
                axes[1].plot(x, [c["top256_R@1"][1] / max(c["t2i_R@1"], 1e-9) for c in curve], "s--",
                             label=f"{v} t->i")
            if curve[0].get("patchdis_mIoU") is not None:
                axes[2].plot(x, [c["patchdis_mIoU"] for c in curve], "o-", label=v)
        axes[1].axhline(0.95, color="grey", lw=0.8, ls=":")
        for ax, t in zip(axes, ("val R@1", "top-256 R@1 / full R@1 (paper: >= 0.95)", "val PatchDis mIoU")):
            ax.set_title(f"{es}: {t}"); ax.set_xlabel("step"); ax.grid(alpha=.3); ax.legend(fontsize=7)
    fig.tight_layout(); fig.savefig(HERE / "curves.png", dpi=110)


def merge_previous(rec: dict, path: Path, es: str | None = None) -> None:
    "Add the variants of an earlier record (of set `es`) at the same horizon that `rec` lacks, with provenance."
    if not path.is_file(): return
    old = json.loads(path.read_text())
    if "sets" in old:  # the per-set layout: this set's record, with the experiment's horizon
        old = {**{k: old.get(k) for k in ("steps", "eval_every", "split")}, **old["sets"].get(es, {"curves": {}})}
    same = {k: (old.get(k), rec[k]) for k in ("steps", "eval_every", "split")}
    if any(o != n for o, n in same.values()):
        raise SystemExit(f"--merge: {path} is another experiment ({same}: old, new); run without --merge")
    # new dicts: the caller's `curves` stay this run's own (only they are finished here and evaluated on test)
    keep = [v for v in old.get("curves", {}) if v not in rec["curves"]]
    rec["curves"] = {**rec["curves"], **{v: old["curves"][v] for v in keep}}
    rec["provenance"] = {**rec["provenance"], **{v: (old.get("provenance") or {}).get(v) or {
        k: old.get(k, "?") for k in ("machine", "commit", "precision", "note")} for v in keep}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", default="params.yaml", help="the base params file")
    ap.add_argument("--variants", default="lexvla,dense,flops,bow,nopenalty", help=f"of {', '.join(VARIANTS)}")
    ap.add_argument("--steps", type=int, default=1200, help="the schedule's horizon")
    ap.add_argument("--eval-every", type=int, default=200, help="steps between val evaluations")
    ap.add_argument("--plateau-gain", type=float, default=0.005, help="mean R@1 gained over the last third")
    ap.add_argument("--only-report", action="store_true", help="redraw from finished points")
    ap.add_argument("--no-test", action="store_true", help="skip the test evaluation and the claims")
    ap.add_argument("--note", default="", help="a paragraph of provenance for results.md (kept in results.json)")
    ap.add_argument("--merge", action="store_true",
                    help="keep the committed results' other variants (same horizon and points), with their provenance")
    ap.add_argument("--out", default="",
                    help="results folder instead of experiments/convergence (e.g. experiments/convergence/h300 for a "
                         "300-step horizon); its runs/ is scratch")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                    help="a lever: change one params key for every variant (VALUE: YAML, else text; repeatable), e.g. "
                         "model.vocab.filter=words or 'model.prompt=...'; recorded in the results")
    ap.add_argument("--caches", default="",
                    help="this experiment's own cache folder (val caches and the training text cache), for a lever "
                         "that changes the prompt or the LM (default: data/textcache and convergence/cache)")
    a = ap.parse_args(argv)
    global HERE, CACHE, OWN_CACHES
    if a.out: HERE = (repo_root() / a.out).resolve()
    if a.caches: CACHE, OWN_CACHES = (repo_root() / a.caches).resolve(), True
    names = [v.strip() for v in a.variants.split(",") if v.strip()]
    bad = [v for v in names if v not in VARIANTS]
    if bad: raise SystemExit(f"--variants: unknown {', '.join(bad)} (have: {', '.join(VARIANTS)})")
    root = repo_root()
    d = experiment_params(root / a.params, names, a.steps, a.eval_every, "val", a.sets)
    data = root / "data" / "prepared"
    if not a.only_report: build_val_caches(d, data, CACHE, train_text=OWN_CACHES)
    by_set = {es: {} for es in eval_sets(d)}
    for name in names:
        if a.only_report:
            for es in by_set:
                done = sorted((HERE / "runs" / "val").glob(f"step-*/{es}/{name}.json"))
                if done: by_set[es][name] = [curve_row(int(f.parent.parent.name[5:]), json.loads(f.read_text()),
                                                       _train_s(name, int(f.parent.parent.name[5:]))) for f in done]
        else:
            for es, curve in run_variant(d, name, data, a.steps, a.eval_every, progress=True).items():
                by_set[es][name] = curve
    rule = (f"a run has plateaued when the last third of its steps gained < {a.plateau_gain} mean R@1 "
            "(mean of i->t and t->i) on val.")
    here = {"machine": machine(), "commit": commit(), "precision": effective_precision(d), "note": a.note,
            "levers": a.sets}
    rec = {"steps": a.steps, "eval_every": a.eval_every, "split": "val", "rule": rule, "plateau_gain": a.plateau_gain,
           "sets": {}}
    for es, curves in by_set.items():
        sub = {"steps": a.steps, "eval_every": a.eval_every, "split": "val", "curves": curves,
               "provenance": {v: here for v in curves}}
        if a.merge: merge_previous(sub, HERE / "results.json", es)
        sub["plateaus"] = {v: plateau(c, a.plateau_gain) for v, c in sub["curves"].items()}
        finished = [v for v, c in curves.items() if c and c[-1]["step"] == a.steps]
        if finished and not a.no_test:
            claims, runs = test_claims(d, finished, data, es=es)
            sub["claims"], sub["test_n_images"] = claims, next(iter(runs.values()))["n_images"]
        rec["sets"][es] = {k: v for k, v in sub.items() if k not in ("steps", "eval_every", "split")}
    report(rec)
    print(f"wrote {HERE / 'results.md'} and {HERE / 'curves.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
