"""The paper's claims with each variant at its own plateau (issue 32). `experiments/convergence.py` decides the claims
between runs of one horizon; when the variants plateau at different horizons (LexVLA flat after 400 steps, dense still
gaining at 600), the fair comparison takes each variant's run from the folder whose horizon is its plateau. This script
puts those runs' **test** evaluations side by side and computes `lexvla.report.paper_claims` over them (95 % paired
bootstrap over images, every evaluated set).

    .venv/bin/python experiments/plateau_claims.py lexvla=experiments/convergence/pictograms_h600 \
        dense=experiments/convergence/pictograms_h900 flops=experiments/convergence/pictograms_h600 \
        --out experiments/convergence/plateau_claims

Each VARIANT=FOLDER names a convergence results folder whose `results.json` has that variant's curve and whose scratch
`runs/test/<set>/` holds its test evaluation (`<variant>.json` and `<variant>/per_query.npz`: convergence.py writes them
when it runs without --no-test). Every variant is paired over the same test images (the default's test caches). The
record says, per variant and set, the horizon and whether val's plateau rule was met there: a claim between runs that
have not plateaued is printed with that caveat, not refused. Writes `claims.json` (a record the report stage renders
in summary.md) and `claims.md`.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def pick(specs: list[str]) -> dict[str, Path]:
    "VARIANT=FOLDER pairs, in order; a malformed or repeated one is an error that names it."
    out = {}
    for s in specs:
        v, sep, folder = s.partition("=")
        if not sep or not v or not folder: raise SystemExit(f"{s!r}: expected VARIANT=FOLDER")
        if v in out: raise SystemExit(f"{v}: given twice ({out[v]} and {folder})")
        out[v] = Path(folder)
    return out


def gather(runs: dict[str, Path]) -> dict:
    """For each variant: its folder, horizon, last val point and plateau per set, and its test evaluation's files;
    a missing record or test evaluation is an error that names the file."""
    got = {}
    for v, folder in runs.items():
        f = folder / "results.json"
        if not f.is_file(): raise SystemExit(f"{f}: no convergence record (run experiments/convergence.py)")
        rec = json.loads(f.read_text())
        sets = {}
        for es, sub in rec["sets"].items():
            curve = sub["curves"].get(v)
            if not curve: raise SystemExit(f"{f}: no curve of {v!r} on set {es!r} (has {', '.join(sub['curves'])})")
            test = folder / "runs" / "test" / es
            if not (test / f"{v}.json").is_file() or not (test / v / "per_query.npz").is_file():
                raise SystemExit(f"{test / v}: no test evaluation of {v!r} (run experiments/convergence.py on {folder} "
                                 "without --no-test)")
            sets[es] = {"step": curve[-1]["step"], "plateau": (sub.get("plateaus") or {}).get(v, {}), "test": test}
        got[v] = {"folder": str(folder), "steps": rec["steps"], "sets": sets}
    return got


def claims(got: dict, topk: int = 256) -> dict:
    "paper_claims per evaluated set over the chosen runs (each run's test files linked into one folder)."
    from lexvla.report import paper_claims
    out = {}
    for es in dict.fromkeys(es for g in got.values() for es in g["sets"]):
        with tempfile.TemporaryDirectory() as d:
            runs = {}
            for v, g in got.items():
                if es not in g["sets"]: continue
                test = g["sets"][es]["test"]
                (Path(d) / v).mkdir()
                (Path(d) / v / "per_query.npz").symlink_to((test / v / "per_query.npz").resolve())
                runs[v] = json.loads((test / f"{v}.json").read_text())
            n = {r["n_images"] for r in runs.values()}
            if len(n) != 1: raise SystemExit(f"set {es}: the runs' test evaluations differ in images ({sorted(n)})")
            out[es] = {"claims": paper_claims(d, runs, topk), "test_n_images": n.pop()}
    return out


def record(got: dict, sets: dict) -> dict:
    "The record the report stage reads: each run's provenance and plateau, and the claims per set."
    runs = {v: {"folder": g["folder"], "steps": g["steps"],
                "plateau": {es: {"step": s["step"], **{k: s["plateau"].get(k) for k in ("reached", "why")}}
                            for es, s in g["sets"].items()}} for v, g in got.items()}
    return {"kind": "plateau_claims", "runs": runs, "sets": sets}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", metavar="VARIANT=FOLDER", help="the convergence folder of each variant's run")
    ap.add_argument("--out", required=True, help="folder for claims.json and claims.md")
    ap.add_argument("--topk", type=int, default=256, help="the sparse point of the matched-words claims")
    a = ap.parse_args(argv)
    got = gather(pick(a.runs))
    rec = record(got, claims(got, a.topk))
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "claims.json").write_text(json.dumps(rec, indent=1) + "\n")
    from lexvla.report import experiments_markdown
    md = "\n".join(experiments_markdown([out / "claims.json"])[4:])  # without the section's heading and preamble
    (out / "claims.md").write_text(md + "\n")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
