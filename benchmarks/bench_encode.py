"""`python -m lexvla.encode` at scale: peak memory flat in the collection size, images/s, and a killed run resumed to
the same bytes as an uninterrupted one.

    python benchmarks/bench_encode.py [--sizes 1000 5000 10000 20000] [--out benchmarks/results/encode.md]

Images: embedded scenes (`lexvla.scenes`, 64 px PNG files, written once to --images). Model: a stand-in, because
the trained embedded model is a DVC output: the tiny preset's towers with a random visual codebook of --V words
(default 21,504, the embedded profile's V), cut to --topk words per image (a trained model's sparsity; a random
codebook keeps half its words above 1/sqrt(V)). Memory and the resume check do not depend on the weights; the
images/s of the real embedded model are lower (its ViT-S/14 at 112 px runs ~55 images/s on 2 cores, method §4).
Each run is its own process, and reports its own peak RSS (ru_maxrss). For comparison, the old path (every dense
vector kept, `torch.cat`, then sparsified) is measured at the smaller sizes.
"""
import argparse
import json
import os
import platform
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch


class Wide(torch.nn.Module):
    "The tiny preset's frozen ViT and adapter, with a random visual codebook of V words: an encoder of realistic V."
    def __init__(self, V: int, seed: int = 0):
        super().__init__()
        from lexvla.model import create_model
        self.base = create_model("tiny").eval()
        g = torch.Generator().manual_seed(seed)
        self.codebook = torch.randn(V, self.base.width, generator=g) / self.base.width ** 0.5
        self.vocab = SimpleNamespace(words=[f"w{i}" for i in range(V)], fingerprint=lambda: f"wide-{V}-{seed}")
        self.dim, self.data_config, self.device = V, self.base.data_config, torch.device("cpu")

    @torch.no_grad()
    def encode_image(self, pixels):
        from lexvla.maxpool import lexical_maxpool
        from lexvla.model import l2norm
        values, _ = lexical_maxpool(self.base.patch_hidden(pixels), self.codebook)
        return l2norm(self.base.lexical_activation(values, "image"))


def write_scenes(folder: Path, n: int) -> Path:
    "n embedded-scene PNGs in folder/ (kept between runs)."
    from PIL import Image
    from lexvla.scenes import make_scene, scene_rng
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        p = folder / f"{i // 1000:03d}" / f"{i:06d}.png"
        if p.is_file(): continue
        p.parent.mkdir(exist_ok=True)
        Image.fromarray(make_scene(scene_rng(0, "test", i)).image).save(p)
    return folder


def child(a):
    "One measured run (in its own process): encode, then print peak RSS, seconds, items."
    from lexvla.sparse import SparseVectors, threshold_for
    from lexvla.vectors import Collection, encode_collection, encode_images, list_images
    torch.set_num_threads(a.threads)
    model = Wide(a.V)
    paths, ids = list_images(a.images)
    paths, ids = paths[:a.n], ids[:a.n]
    t0 = time.perf_counter()
    if a.mode == "stream":
        r = encode_collection(model, Collection("image", ids, paths, "scenes"), a.shards, a.shard_size,
                              a.batch_size, "auto", a.topk)
    else:  # the old path: (n, V) dense, then sparsified
        from lexvla.transforms import image_transform
        dense = encode_images(model, paths, image_transform(model.data_config, train=False), a.batch_size)
        r = {"nnz": SparseVectors.from_dense(dense, threshold_for(a.V), a.topk, ids).nnz}
    secs = time.perf_counter() - t0
    print(json.dumps({**r, "n": a.n, "seconds": secs, "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                      * 1024}))


def measure(a, mode: str, n: int, shards: Path) -> dict:
    cmd = [sys.executable, __file__, "--child", mode, "--n", str(n), "--shards", str(shards), "--images",
           str(a.images), "--V", str(a.V), "--topk", str(a.topk), "--shard-size", str(a.shard_size),
           "--batch-size", str(a.batch_size), "--threads", str(a.threads)]
    r = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


def files(folder: Path) -> dict:
    return {f.name: f.read_bytes() for f in sorted(folder.iterdir())}


def killed_and_resumed(a, n: int, tmp: Path) -> dict:
    "Kill a run once 2 shards are written, rerun it, and compare every file with an uninterrupted run's."
    whole, cut = tmp / "whole", tmp / "cut"
    measure(a, "stream", n, whole)
    cmd = [sys.executable, __file__, "--child", "stream", "--n", str(n), "--shards", str(cut), "--images",
           str(a.images), "--V", str(a.V), "--topk", str(a.topk), "--shard-size", str(a.shard_size),
           "--batch-size", str(a.batch_size), "--threads", str(a.threads)]
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while p.poll() is None and len(list(cut.glob("shard-*.npz"))) < 2: time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    done = len(list(cut.glob("shard-*.npz")))
    r = measure(a, "stream", n, cut)
    return {"n": n, "shards_before_kill": done, "written_after": r["written"], "identical": files(cut) == files(whole)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 5000, 10000, 20000])
    ap.add_argument("--dense-sizes", type=int, nargs="*", default=[1000, 5000, 10000], help="old path sizes")
    ap.add_argument("--resume-n", type=int, default=5000)
    ap.add_argument("--V", type=int, default=21504)
    ap.add_argument("--topk", type=int, default=256)
    ap.add_argument("--shard-size", type=int, default=1024)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--images", type=Path, default=Path(tempfile.gettempdir()) / "lexvla-bench-scenes")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--child", choices=["stream", "dense"], default=None)
    ap.add_argument("--n", type=int, default=0)
    ap.add_argument("--shards", type=Path, default=None)
    a = ap.parse_args()
    if a.child:
        a.mode = a.child
        return child(a)
    t0 = time.perf_counter()
    write_scenes(a.images, max(a.sizes + a.dense_sizes + [a.resume_n]))
    t_scenes = time.perf_counter() - t0
    tmp = Path(tempfile.mkdtemp(prefix="lexvla-bench-encode-"))
    rows = []
    try:
        for n in a.sizes: rows.append({"mode": "stream", **measure(a, "stream", n, tmp / f"s{n}")})
        for n in a.dense_sizes: rows.append({"mode": "dense", **measure(a, "dense", n, tmp / f"d{n}")})
        resume = killed_and_resumed(a, a.resume_n, tmp)
    finally: shutil.rmtree(tmp, ignore_errors=True)
    stream = [r for r in rows if r["mode"] == "stream"]
    spread = max(r["peak_rss"] for r in stream) / min(r["peak_rss"] for r in stream) - 1
    lines = [f"# Encoding a collection: `python -m lexvla.encode` (lexvla.vectors.encode_collection)", "",
             f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs (shared with other jobs), "
             f"torch threads {a.threads}, python {platform.python_version()}, torch {torch.__version__}. "
             f"Stand-in model: tiny preset's ViT + adapter with a random codebook of V = {a.V:,} words (the "
             f"embedded profile's V), top-{a.topk} words per image after the 1/sqrt(V) threshold; embedded scenes, "
             f"64 px PNG; shards of {a.shard_size} images, batches of {a.batch_size}. Scenes written in "
             f"{t_scenes:.0f} s (not timed below).", "",
             "| path | images | peak RSS (MiB) | n x V x 4 bytes (MiB) | seconds | images/s |", "|---|---|---|---|---|---|"]
    for r in rows:
        what = "shards (batch-sparsified)" if r["mode"] == "stream" else "old: dense torch.cat, then sparsified"
        lines.append(f"| {what} | {r['n']:,} | {r['peak_rss'] / 2**20:,.0f} | {r['n'] * a.V * 4 / 2**20:,.0f} | "
                     f"{r['seconds']:.1f} | {r['n'] / r['seconds']:.0f} |")
    lines += ["", f"Peak RSS of the sharded path from {min(a.sizes):,} to {max(a.sizes):,} images: spread "
              f"{100 * spread:.1f} % (flat: memory is O(batch x V + one shard), not O(n x V)).", "",
              f"Killed after {resume['shards_before_kill']} of {-(-resume['n'] // a.shard_size)} shards "
              f"({resume['n']:,} images) and rerun: {resume['written_after']} shards written, every file "
              f"{'byte-identical' if resume['identical'] else 'DIFFERENT'} to an uninterrupted run's.", ""]
    text = "\n".join(lines)
    print(text)
    if a.out: a.out.write_text(text)
    if a.json: a.json.write_text(json.dumps({"rows": rows, "resume": resume, "spread": spread}))


if __name__ == "__main__":
    main()
