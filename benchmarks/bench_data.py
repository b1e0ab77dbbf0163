"""Data throughput: the scene generator, and decoded + transformed images/s from the training shards.

    python benchmarks/bench_data.py [--params params.yaml] [--out benchmarks/results/data.md]

Reads the shards of data/prepared (or builds the params' dataset in a temp folder when there are none), with the
worker count and batch size of `train`, the transform from the vision backbone's timm config, and prints a
Markdown table (also written to --out). The training step's consumption rate is added beside it by the train
benchmark. Runs in well under 2 minutes on 2 CPU cores.
"""
import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from lexvla.datasets import (backbone_data_config, collate_pairs, encode_jpeg, image_transform, prepared_paths,
                             streaming_dataset, train_dataset)
from lexvla.params import load_params, repo_root
from lexvla.prepare import prepare
from lexvla.scenes import make_scene, scene_rng


def rate(fn, n_items, min_s=None):
    "Items per second of fn() (which handles n_items), repeated until min_s has passed; first call is a warm-up."
    min_s = MIN_S if min_s is None else min_s
    fn()
    t0, done = time.perf_counter(), 0
    while time.perf_counter() - t0 < min_s:
        fn(); done += n_items
    return done / (time.perf_counter() - t0)


MIN_S = 4.0  # seconds each rate is measured for (--min-s)
SEEN: dict[str, list[str]] = {}  # what each loader yielded in one epoch: the tests check that nothing is lost


def loader_rate(ds, batch_size, workers, epochs=1):
    def go():
        g = torch.Generator(); g.manual_seed(0)
        keys = []
        for b in torch.utils.data.DataLoader(ds, batch_size=batch_size, num_workers=workers, collate_fn=collate_pairs,
                                             drop_last=True, generator=g):
            keys += b["keys"]
        SEEN[f"train_dataset, {workers} workers"] = keys
    n = (len(ds) // batch_size) * batch_size
    return rate(go, n, min_s=MIN_S)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--out", default=str(repo_root() / "benchmarks" / "results" / "data.md"))
    ap.add_argument("--min-s", type=float, default=MIN_S, help="seconds each rate is measured for")
    ap.add_argument("--json", default=None, help="also write the rates and what each loader yielded (the tests)")
    a = ap.parse_args(argv)
    globals()["MIN_S"] = a.min_s
    p = load_params(a.params)
    pp, tp, vp = p.prepare, p.train, p.model.vision
    torch.set_num_threads(1)  # as in a DataLoader worker
    rows = []

    size = vp.img_size  # the scenes are drawn at the vision tower's input size
    rows.append((f"generator: draw one {size} px scene + 5 captions (1 process)",
                 rate(lambda: [make_scene(scene_rng(0, "train", i), size) for i in range(50)], 50)))
    rows.append(("generator: draw + JPEG encode (1 process)",
                 rate(lambda: [encode_jpeg(make_scene(scene_rng(0, "train", i), size).image) for i in range(50)], 50)))

    data = repo_root() / "data" / "prepared"
    tmp = None
    if not (data / "train").is_dir():
        tmp = tempfile.TemporaryDirectory()
        data = Path(tmp.name) / "prepared"
    t0 = time.perf_counter()
    if tmp is not None:
        prepare(p, data, progress=False)
        rows.append((f"prepare stage, whole default set ({pp.n_train + pp.n_val + pp.n_test} images, "
                     f"{pp.workers} workers)", (pp.n_train + pp.n_val + pp.n_test) / (time.perf_counter() - t0)))
    shards = prepared_paths(data)["shards"]
    cfg = backbone_data_config(vp.timm_name, vp.img_size)
    tf = image_transform(cfg, train=True)
    ds = train_dataset(shards, tf, seed=p.base.seed, captions_per_image=tp.captions_per_image)
    for w in sorted({0, tp.num_workers, 2}):
        tag = " (train.num_workers)" if w == tp.num_workers else ""
        rows.append((f"train_dataset: decode + timm train transform, {w} workers{tag}, batch {tp.batch_size}",
                     loader_rate(ds, tp.batch_size, w)))

    def stream():
        SEEN["streaming_dataset"] = [s["key"] for s in streaming_dataset(shards, tf, seed=0, shuffle=1000)]
    rows.append(("streaming_dataset (wds.WebDataset), 0 workers", rate(stream, len(ds), min_s=MIN_S)))

    head = (f"# Data throughput\n\nMachine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, "
            f"torch {torch.__version__}, Python {platform.python_version()}. Images {size} px, "
            f"{len(ds)} training images in {len(shards)} shards; transform: timm `create_transform` from "
            f"`{vp.timm_name}`'s data config at {vp.img_size} px.\n\n"
            "| what | images/s |\n|---|---:|\n")
    table = head + "".join(f"| {k} | {v:,.0f} |\n" for k, v in rows)
    table += ("\nThe training step's consumption rate on this machine is added by the train benchmark; loading is "
              "not the bottleneck while the rate above exceeds it.\n")
    print(table)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(table)
    if a.json:
        import json
        Path(a.json).write_text(json.dumps({"rows": rows, "train_keys": list(ds.keys), "batch_size": tp.batch_size,
                                            "seen": SEEN}) + "\n")
    if tmp is not None: tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
