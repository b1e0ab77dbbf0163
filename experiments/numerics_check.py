"""Did a change meant to keep the method move what the default measures? Two evaluations, paired over images (issue 33).

    .venv/bin/python experiments/numerics_check.py BEFORE AFTER [--out FILE.md] [--json FILE.json]

BEFORE and AFTER are folders of the evaluate stage's layout (`<set>/<variant>.json` and
`<set>/<variant>/per_query.npz`), e.g. `results/evaluate` of two `dvc repro` runs, or val evaluations of two runs'
models. Every set and variant found in both is compared on the same images and captions (a different split is an error
that names the file): R@1 both ways with the full vectors and PatchDis mIoU, each as before, after, and after - before
with a 95 % paired bootstrap over images (each image with all its captions; 2000 resamples). A change that keeps the
method (other rounding, batching, a faster kernel) should leave every interval around 0 and every claim's verdict
where it was; a change of a model's bits moves a single seed's numbers by about what another seed would.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path: sys.path.insert(0, str(ROOT))

from lexvla.metrics import load_per_query, mean_iou, paired_bootstrap, per_image_hits, ratio_of_sums  # noqa: E402


def pairs(before: Path, after: Path) -> list[tuple[str, str]]:
    "(set, variant) evaluated in both folders, sorted; none is an error naming the folders."
    def found(root):
        return {(p.parent.name, p.stem) for p in root.glob("*/*.json")
                if (p.parent / p.stem / "per_query.npz").is_file()}
    both = sorted(found(before) & found(after))
    if not both:
        raise SystemExit(f"no evaluation (<set>/<variant>.json with per_query.npz) in both {before} and {after}")
    return both


def compare(before: Path, after: Path, es: str, variant: str, n_boot: int = 2000) -> list[dict]:
    "One row per metric: before, after and after - before with its 95 % paired-bootstrap interval."
    qa, qb = (load_per_query(root / es / variant / "per_query.npz") for root in (before, after))
    if not np.array_equal(qa["txt2img"], qb["txt2img"]):
        raise SystemExit(f"{after / es / variant / 'per_query.npz'}: other captions or images than {before} has")
    t2i = qa["txt2img"]
    n = int(t2i.max()) + 1
    rows = []
    for d, short in (("image_to_text", "i->t R@1"), ("text_to_image", "t->i R@1")):
        a, b = per_image_hits(qa["ranks"]["dense"], t2i)[d], per_image_hits(qb["ranks"]["dense"], t2i)[d]
        rows.append((short, lambda w, a=a: ratio_of_sums(*a, w), lambda w, b=b: ratio_of_sums(*b, w)))
    if qa["patchdis"] and qb["patchdis"]:
        pa, pb = qa["patchdis"], qb["patchdis"]
        rows.append(("PatchDis mIoU", lambda w: mean_iou(pa["intersection"], pa["union"], w),
                     lambda w: mean_iou(pb["intersection"], pb["union"], w)))
    out = []
    for name, fa, fb in rows:
        ci = paired_bootstrap(lambda w: fb(w) - fa(w), n, n_boot)
        out.append({"set": es, "variant": variant, "metric": name, "before": float(fa(None)),
                    "after": float(fb(None)), "change": ci})
    return out


def markdown(rows: list[dict], before: Path, after: Path) -> str:
    md = [f"Before: `{before}`; after: `{after}`. After - before with a 95 % paired bootstrap over images.", "",
          "| set | variant | metric | before | after | after - before | 95 % interval |",
          "|---|---|---|---|---|---|---|"]
    for r in rows:
        c = r["change"]
        md.append(f"| {r['set']} | {r['variant']} | {r['metric']} | {r['before']:.3f} | {r['after']:.3f} | "
                  f"{c['estimate']:+.3f} | [{c['low']:+.3f}, {c['high']:+.3f}] |")
    return "\n".join(md) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("before", type=Path)
    ap.add_argument("after", type=Path)
    ap.add_argument("--out", type=Path, default=None, help="write the markdown table here (default: print it)")
    ap.add_argument("--json", type=Path, default=None, help="also write the rows as JSON")
    a = ap.parse_args(argv)
    rows = [r for es, v in pairs(a.before, a.after) for r in compare(a.before, a.after, es, v)]
    md = markdown(rows, a.before, a.after)
    if a.out: a.out.parent.mkdir(parents=True, exist_ok=True); a.out.write_text(md)
    else: print(md)
    if a.json: a.json.parent.mkdir(parents=True, exist_ok=True); a.json.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
