"""How many distinct training scenes the pictograms world needs (issue 31): the default's LexVLA trained on N scenes
for each N, evaluated on **val** of `seen` and `unseen`, beside its final in-batch training loss (memorisation shows
as a low training loss while val stalls) and how many concepts its training scenes draw. A documented experiment
outside the default `dvc repro`.

    .venv/bin/python experiments/scene_count.py --counts 2000,6000     # after `dvc repro` (reuses its stages)
    .venv/bin/python experiments/scene_count.py --only-report

Each N is a scratch copy of the repository (its tracked and untracked files, as `tests/conftest.fresh_copy` makes)
running `dvc repro evaluate@lexvla-seen evaluate@lexvla-unseen` (LexVLA alone is trained) with `prepare.n_train = N`
and `evaluate.split = val`; every other setting is params.yaml's. The copies use one DVC cache (`--cache`,
default this repository's), so a stage that already ran with the same inputs, such as the default's own training
at N = 2,000, is restored from DVC's run cache instead of run again.

Writes `scene_count/results.json` and `scene_count/results.md` next to this file; `scene_count/runs/` is scratch
(git-ignored), and a finished N is not run again.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent / "scene_count"
BIN = Path(sys.executable).parent


def copy_repo(dest: Path, n_train: int, cache: Path) -> None:
    "A scratch copy of the repository whose params train LexVLA on `n_train` scenes and evaluate val."
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True,
                           check=True).stdout.decode().split("\0")
    for f in filter(None, files):
        src = ROOT / f
        if f == "dvc.lock" or f.startswith(("results/", "experiments/")) or not src.is_file(): continue
        (dest / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dest / f)
    d = yaml.safe_load((ROOT / "params.yaml").read_text())
    d["prepare"]["n_train"] = n_train
    d["evaluate"]["split"] = "val"
    (dest / "params.yaml").write_text(yaml.safe_dump(d, sort_keys=False))
    git = ["git", "-c", "user.name=lexvla", "-c", "user.email=lexvla@example.invalid", "-c", "init.defaultBranch=main"]
    for cmd in (["init", "-q"], ["add", "-A"], ["commit", "-qm", f"scene count {n_train}"]):
        subprocess.run(git + cmd, cwd=dest, check=True, capture_output=True)
    subprocess.run([str(BIN / "dvc"), "config", "--local", "cache.dir", str(cache)], cwd=dest, check=True)


def run_count(n_train: int, cache: Path) -> dict:
    "Train and evaluate one N (its copy is kept; a finished N is read back)."
    dest = HERE / "runs" / f"n{n_train}"
    done = dest / "results" / "evaluate" / "unseen" / "lexvla.json"
    if not done.is_file():
        if dest.exists(): shutil.rmtree(dest)
        copy_repo(dest, n_train, cache)
        env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "PYTHONPATH": str(dest)}
        subprocess.run([str(BIN / "dvc"), "repro", "evaluate@lexvla-seen", "evaluate@lexvla-unseen"], cwd=dest,
                       env=env, check=True)
    ev = {s: json.loads((dest / "results" / "evaluate" / s / "lexvla.json").read_text()) for s in ("seen", "unseen")}
    live = json.loads((dest / "results" / "train" / "lexvla" / "live" / "metrics.json").read_text())["train"]
    rep = json.loads((dest / "data" / "prepared" / "train" / "report.json").read_text())
    row = {"n_train": n_train, "train_contrastive_loss": live["contrastive_loss"],
           "concepts_drawn": rep["classes_drawn"], "distinct_caption_words": rep["caption_words"]["distinct_words"]}
    for s, r in ev.items():
        th = next(x for x in r["sparsity"] if x["name"] == "threshold")
        row[s] = {"i2t_R@1": r["dense"]["image_to_text_R@1"], "t2i_R@1": r["dense"]["text_to_image_R@1"],
                  "i2t_R@10": r["dense"]["image_to_text_R@10"], "t2i_R@10": r["dense"]["text_to_image_R@10"],
                  "active_words": th["image_active_words"], "chance_t2i_R@1": r["chance"]["text_to_image_R@1"],
                  "n_images": r["n_images"]}
    return row


def report(rows: list[dict]) -> None:
    md = ["# Training scenes: how many the pictograms world needs (val)", "",
          "LexVLA (overuse penalty), the default's 300 steps of 64 pairs, trained on N scenes; R@1 / R@10 on the "
          "**val** split of each evaluated set (full vectors). Written by `experiments/scene_count.py`.", "",
          "| N scenes | concepts drawn | final in-batch loss | seen R@1 i->t / t->i | seen R@10 i->t / t->i | "
          "unseen R@1 i->t / t->i | unseen R@10 i->t / t->i |", "|---|---|---|---|---|---|---|"]
    f = lambda r, k: f"{r[k]:.3f}"
    for r in rows:
        s, u = r["seen"], r["unseen"]
        md.append(f"| {r['n_train']:,} | {r['concepts_drawn']} | {r['train_contrastive_loss']:.3f} | "
                  f"{f(s, 'i2t_R@1')} / {f(s, 't2i_R@1')} | {f(s, 'i2t_R@10')} / {f(s, 't2i_R@10')} | "
                  f"{f(u, 'i2t_R@1')} / {f(u, 't2i_R@1')} | {f(u, 'i2t_R@10')} / {f(u, 't2i_R@10')} |")
    if rows: md += ["", f"Chance text->image R@1: {rows[0]['seen']['chance_t2i_R@1']:.4f} "
                        f"({rows[0]['seen']['n_images']} val images per set)."]
    HERE.mkdir(parents=True, exist_ok=True)
    (HERE / "results.json").write_text(json.dumps({"rows": rows}, indent=1) + "\n")
    (HERE / "results.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--counts", default="2000,6000", help="training scene counts, comma-separated")
    ap.add_argument("--cache", default=str(ROOT / ".dvc" / "cache"), help="the DVC cache the copies share")
    ap.add_argument("--only-report", action="store_true", help="rewrite the tables from the finished counts")
    a = ap.parse_args(argv)
    counts = [int(c) for c in a.counts.split(",")]
    if a.only_report:
        counts = [c for c in counts if (HERE / "runs" / f"n{c}" / "results" / "evaluate" / "unseen" /
                                        "lexvla.json").is_file()]
    report([run_count(n, Path(a.cache).resolve()) for n in counts])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
