"""Where a training step of the embedded default spends its time, and how close its GEMMs run to the machine's own.

    python benchmarks/bench_train.py [--params params.yaml] [--batch 64] [--reps 3] [--precision train|fp32|bf16] [--out auto|-|FILE]

Builds the models that `dvc repro` trains (params.yaml's model section: SmolLM2-135M + LoRA on its last 2 layers,
the frozen DINOv2 ViT-S/14) and times, on one batch of the prepared training data (or random pixels and captions
when data/prepared is missing), what a training step of the default runs:

- the frozen ViT's forward (what the image cache saves: training reads its tokens), the adapter on cached tokens
  (forward + backward), the text tower's LoRA layers on the cached frozen prefix (and the whole LM without the cache,
  for comparison), the lexical head (patch x vocabulary max-pool, ELU1p, L2 norm), the loss (InfoNCE + penalty);
- a whole optimiser step (forward, backward, AdamW) of LexVLA and of the dense baseline, from the caches, as
  `train.train_step` runs it;
- the machine's own matrix-multiply rates in bf16 and fp32 at the head's shape ((b x n, d) x (d, V)), so that the
  lexical head's achieved rate can be read as a share of what this machine's GEMM does. The head's useful work is
  its forward GEMM, 2 b n V d FLOPs (the paper's P x V x d per image); its backward is sparse (each word's gradient
  goes to its winning patch only: 4 b V d FLOPs).

Time = best of `--reps` runs after a warm-up; throughput = batch / step time. Prints a markdown table and writes it
to `--out`. Runs on the CPU (the CI machine: 2 cores) or, with --device cuda, on a GPU.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time
from pathlib import Path

import torch


def best_time(fn, reps: int, sync) -> float:
    fn(); sync()  # warm-up
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter(); fn(); sync(); best = min(best, time.perf_counter() - t)
    return best


def cpu_name() -> str:
    "The CPU's model name (/proc/cpuinfo), or platform's answer."
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"): return line.split(":", 1)[1].strip()
    except OSError: pass
    return platform.processor() or "CPU"


ISA_LIMITS = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")  # torch's, oneDNN's, MKL's


def isa_limit() -> str | None:
    "The kernel instruction-set limits set in the environment (how an AVX512 CPU stands in for AVX2-only), or None."
    return ", ".join(f"{k}={os.environ[k]}" for k in ISA_LIMITS if os.environ.get(k)) or None


def cpu_kind(flags: dict) -> str:
    "The machine class the README's tables name: AVX512-BF16 / AMX, AVX512 without BF16, or AVX2 only."
    if isa_limit() and "avx2" in isa_limit().lower():
        return f"AVX2 only, emulated: the kernels held to AVX2 ({isa_limit()}) on a CPU that has more"
    if flags["amx"]: return "AMX (native bf16)"
    if flags["avx512_bf16"]: return "AVX512-BF16 (native bf16)"
    if torch.cpu._is_avx512_supported(): return "AVX512 without BF16 (bf16 emulated by oneDNN: training runs fp32)"
    return "AVX2 only (no bf16 kernels: training runs fp32)"


def kind_slug(flags: dict) -> str:
    "The CPU kind as a file-name part: amx, avx512_bf16, avx512 (no BF16), avx2 or avx2_emulated."
    if isa_limit() and "avx2" in isa_limit().lower(): return "avx2_emulated"
    if flags["amx"]: return "amx"
    if flags["avx512_bf16"]: return "avx512_bf16"
    return "avx512" if torch.cpu._is_avx512_supported() else "avx2"


def rows_t(rows, prefix: str) -> float:
    return next(t for n, t, _ in rows if n.startswith(prefix))


def loader_and_text_cache(a, lex, params, b, source, part, rows) -> list[str]:
    "Time the training loader's batch and the text cache's tokens/s; return lines on padding and duplicate captions."
    from lexvla.pairs import collate_pairs, train_dataset
    from lexvla.prepared import prepared_paths
    from lexvla.transforms import image_transform
    from lexvla.textcache import build_text_cache, cache_order
    cpi = params.train.captions_per_image
    if source == "data/prepared":
        from lexvla.runtime import repo_root
        shards = prepared_paths(repo_root() / "data" / "prepared", "train")["shards"]
        # what BatchSource reads with the image cache on: decode + the eval transform, although the step reads the
        # cached tokens (the loader runs in its own worker beside the step)
        ds = train_dataset(shards, image_transform(lex.data_config, train=False), seed=0, captions_per_image=cpi)
        dl = torch.utils.data.DataLoader(ds, batch_size=b, num_workers=0, collate_fn=collate_pairs, drop_last=True)
        it = iter(dl)
        part("data: one batch from the training loader (decode + transform, in a worker)", lambda: next(it),
             "beside the step, not in it")
        raw = [c for i in range(len(ds.samples)) for c in ds.captions(i)[:cpi]]
    else:
        raw = [f"a {c} {s} left of a {s2}" for c, s, s2 in zip(["red", "blue", "green", "pink"] * 64,
                                                               ["circle", "star", "ring"] * 86, ["square", "moon"] * 128)]
    uniq = list(dict.fromkeys(raw))
    sample = uniq[:4 * b]
    mp = "bf16" if a.precision == "bf16" else "no"  # the stage computes training's cache at the training's precision
    t = best_time(lambda: build_text_cache(lex, sample, batch_size=b, progress=False, mp=mp), 1, lambda: None)
    real = sum(int(lex.tokenize([c])["attention_mask"].sum()) for c in sample)
    rows.append((f"text cache: frozen LM prefix over 4 batches (token-sorted, {a.precision})", t,
                 f"{real / t:.0f} real tokens/s, {len(sample) / t:.1f} captions/s"))
    print(f"{rows[-1][0]:58s} {t * 1000:9.1f} ms", file=sys.stderr)
    def padded(order):
        tot = 0
        for s in range(0, len(order), b):
            m = lex.tokenize([uniq[i] for i in order[s:s + b]])["attention_mask"]
            tot += m.numel()
        return tot
    n_real = sum(int(lex.tokenize(uniq[s:s + b])["attention_mask"].sum()) for s in range(0, len(uniq), b))
    as_read, by_chars = padded(list(range(len(uniq)))), padded(sorted(range(len(uniq)), key=lambda i: len(uniq[i])))
    by_tokens = padded(cache_order(lex, uniq))
    return [f"Text cache over the {len(raw)} training captions ({cpi} per image): {1 - len(uniq) / len(raw):.1%} are "
            f"duplicates (encoded once); {n_real} real tokens; padding would be {1 - n_real / as_read:.1%} of the "
            f"tokens in reading order, {1 - n_real / by_chars:.1%} sorted by characters (the cache before issue 33) "
            f"and {1 - n_real / by_tokens:.1%} in the cache's batches (sorted by token count)."]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", choices=["train", "fp32", "bf16"], default="train",
                    help="train (default): what train.precision resolves to on this machine (fp32 where bf16 is not "
                         "native); bf16: autocast, emulated or not")
    ap.add_argument("--preset", default=None, help="a registry preset instead of params.yaml's model (e.g. tiny)")
    ap.add_argument("--out", default="auto",
                    help="where the table goes (auto: benchmarks/results/train_<CPU kind>.md, e.g. train_avx2.md; "
                         "'-': nowhere)")
    a = ap.parse_args(argv)

    from lexvla.pairs import collate_pairs, train_dataset
    from lexvla.prepared import prepared_paths
    from lexvla.transforms import image_transform
    from lexvla.losses import create_loss, elu1p
    from lexvla.maxpool import lexical_maxpool
    from lexvla.model import create_model, create_model_from_params, l2norm
    from lexvla.params import load_params
    from lexvla.runtime import repo_root
    from lexvla.textcache import build_text_cache
    from lexvla.trainstep import cpu_bf16_flags, mixed_precision, param_groups

    torch.manual_seed(0)
    dev = torch.device(a.device)
    sync = (lambda: torch.cuda.synchronize()) if dev.type == "cuda" else (lambda: None)
    params = load_params(a.params)
    asked = "" if a.precision == "train" else f" --precision {a.precision}"  # for the table's command line
    if a.precision == "train":
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            a.precision = "bf16" if mixed_precision(params.train.precision, dev.type) == "bf16" else "fp32"
    make = (lambda v: create_model(a.preset, variant=v)) if a.preset else (lambda v: create_model_from_params(params, variant=v))
    lex, dense = make("lexvla").to(dev).train(), make("dense").to(dev).train()
    b = a.batch
    try:
        p = prepared_paths(repo_root() / "data" / "prepared", "train")
        ds = train_dataset(p["shards"], image_transform(lex.data_config, train=True), seed=0, captions_per_image=2)
        batch = collate_pairs([ds[i] for i in range(b)])
        pixels, captions, source = batch["pixels"], batch["captions"], "data/prepared"
    except Exception:
        size = lex.config.vision.img_size
        pixels = torch.randn(b, 3, size, size)
        captions = [f"a {c} {s} left of a {s2}" for c, s, s2 in zip(["red", "blue", "green", "pink"] * b,
                                                                     ["circle", "star", "ring"] * b, ["square", "moon"] * b)][:b]
        source = "random pixels, synthetic captions"
    pixels = pixels.to(dev)
    cache = build_text_cache(lex, captions, progress=False)
    prefix = tuple(t.to(dev) for t in cache.lookup(captions))
    loss_fn = create_loss("overuse", lambda_img=1e-3, lambda_txt=1e-3, warmup_steps=0)
    V, d = lex.vocab.size, lex.width

    rows = []
    import contextlib
    def amp():  # forward under autocast, backward outside it: as accelerate runs a training step
        return torch.autocast(dev.type, dtype=torch.bfloat16) if a.precision == "bf16" else contextlib.nullcontext()

    def part(name, fn, note=""):
        t = best_time(fn, a.reps, sync)
        rows.append((name, t, note)); print(f"{name:58s} {t * 1000:9.1f} ms", file=sys.stderr)
        return t

    toks = lex.vision_tokens(pixels).detach()  # (b, n, d_vit): what the image cache holds
    def vit_forward():
        with torch.no_grad(), amp(): lex.vision_tokens(pixels)
    def adapter():
        with amp(): h = lex.patch_hidden(tokens=toks)
        h.backward(torch.randn_like(h))
    def text_cached():
        with amp(): h = lex.text_hidden_from_prefix(*prefix)
        h.backward(torch.randn_like(h))
    def text_full():
        tok = lex.tokenize(captions)
        with amp():
            hid, m = lex.text_prefix(tok)  # no_grad: the frozen layers
            h = lex.text_hidden_from_prefix(hid, m)
        h.backward(torch.randn_like(h))
    with torch.no_grad(): H = lex.patch_hidden(tokens=toks).detach()
    Hg = H.clone().requires_grad_(True)
    def head():
        with amp():
            v, _ = lexical_maxpool(Hg, lex.visual_codebook)
            s = l2norm(elu1p(v))
        s.backward(torch.randn_like(s))
    def head_fwd():
        with torch.no_grad(), amp(): lexical_maxpool(Hg, lex.visual_codebook)
    def head_naive():
        with amp(): s = l2norm(elu1p(torch.einsum("bnd,vd->bnv", Hg, lex.visual_codebook).amax(1)))
        s.backward(torch.randn_like(s))
    th = torch.randn(b, d, device=dev)
    def text_head():
        t = th.clone().requires_grad_(True)
        with amp(): s = l2norm(elu1p(t @ lex.text_codebook.T))
        s.backward(torch.randn_like(s))
    fi = l2norm(torch.rand(b, V, device=dev)).requires_grad_(True)
    ft = l2norm(torch.rand(b, V, device=dev)).requires_grad_(True)
    def loss():
        with amp(): l = loss_fn(fi, ft, torch.tensor(14.3, device=dev), None)["loss"]
        l.backward()

    n_patches = H.shape[1]
    head_flops = 2 * b * n_patches * V * d  # the forward GEMM: the head's useful work
    gemm = {}
    for name, dt in (("bf16", torch.bfloat16), ("fp32", torch.float32)):  # the machine's own GEMM at the head's shape
        A, B = H.reshape(-1, d).to(dt), lex.visual_codebook.detach().to(dt)
        gemm[name] = head_flops / best_time(lambda: A @ B.T, a.reps, sync)
        print(f"GEMM {name} (b*n, d) x (d, V): {gemm[name] / 1e9:.1f} GFLOP/s", file=sys.stderr)
    def rate(t):  # the head's useful FLOPs per second, as a share of this machine's GEMM in the step's precision
        return f"{head_flops / t / 1e9:.0f} GFLOP/s = {head_flops / t / gemm[a.precision]:.0%} of the {a.precision} GEMM"
    part("vision: frozen ViT forward (the image cache saves it)", vit_forward, f"{n_patches} patches, not in a step")
    part("vision: adapter on cached tokens, fwd+bwd", adapter, f"{n_patches} patches")
    part("text: LoRA layers on the cached prefix, fwd+bwd", text_cached, f"{lex.n_layers - lex.text_prefix_layers} of {lex.n_layers} layers")
    part("text: whole LM (no cache), fwd+bwd", text_full, "what the text cache saves")
    t_hf = part("lexical head, image: fused max-pool, forward only", head_fwd, "")
    t_h = part("lexical head, image: fused max-pool + ELU1p + L2, fwd+bwd", head, f"{n_patches} x V={V}")
    rows[-2] = (rows[-2][0], t_hf, rate(t_hf))
    rows[-1] = (rows[-1][0], t_h, f"{n_patches} x V={V}: {rate(t_h)}")
    part("lexical head, image: naive einsum max, fwd+bwd", head_naive, "for comparison")
    part("lexical head, text: h Z_txt + ELU1p + L2, fwd+bwd", text_head, f"V={V}")
    part("loss: InfoNCE + overuse penalty, fwd+bwd", loss, f"b={b}, V={V}")

    def step_fn(model):
        opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-5)
        def step():
            with amp():
                out = model(image_tokens=toks, text_prefix=prefix)
                l = loss_fn(out["image_features"], out["text_features"], out["logit_scale"], None)["loss"]
            l.backward()
            opt.step(); opt.zero_grad(set_to_none=True)
        return step
    t_lex = part("whole step, LexVLA (cached ViT tokens and text prefix)", step_fn(lex), "fwd+bwd+AdamW")
    t_dense = part("whole step, dense baseline (same towers and caches)", step_fn(dense), "fwd+bwd+AdamW")
    # the optimiser alone, with LexVLA's gradients in place (its share of the step)
    trainable = [q for q in lex.parameters() if q.requires_grad]
    for q in trainable: q.grad = torch.randn_like(q) * 1e-3
    opt = torch.optim.AdamW(param_groups(lex, 0.05), lr=1e-9)
    t_opt = part("optimiser: AdamW step over LexVLA's trainable parameters", opt.step,
                 f"{sum(q.numel() for q in trainable) / 1e6:.1f} M parameters")
    extra = loader_and_text_cache(a, lex, params, b, source, part, rows)
    rows.append(("GEMM rate, bf16, (b*n, d) x (d, V)", head_flops / gemm["bf16"], f"{gemm['bf16'] / 1e9:.0f} GFLOP/s"))
    rows.append(("GEMM rate, fp32, (b*n, d) x (d, V)", head_flops / gemm["fp32"], f"{gemm['fp32'] / 1e9:.0f} GFLOP/s"))

    when = datetime.date.today().isoformat()
    dev_name = (torch.cuda.get_device_name(0) if dev.type == "cuda"
                else f"{cpu_name()}, {torch.get_num_threads()} threads, {cpu_kind(cpu_bf16_flags())}")
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    md = [f"# Benchmark: where a training step spends its time\n",
          f"`{' '.join(f'{k}={os.environ[k]}' for k in ISA_LIMITS if os.environ.get(k)) + ' ' if isa_limit() else ''}"
          f"python benchmarks/bench_train.py{' --preset ' + a.preset if a.preset else ''} --batch {b}{asked}` ({when}, "
          f"{dev_name}, "
          f"torch {torch.__version__}, {a.precision}{' autocast' if a.precision == 'bf16' else ''}). Model: {'preset ' + a.preset if a.preset else 'params.yaml'} "
          f"(V = {V}, LM width {d}, {n_patches} patches); batch {b} from {source}. "
          f"Best of {a.reps} after a warm-up; each part runs forward + backward on its own. Load average at the end: {load} "
          f"({os.cpu_count()} CPUs).\n",
          "| part | time per batch | note |", "|---|---|---|"]
    md += [f"| {n} | {t * 1000:.1f} ms | {note} |" for n, t, note in rows]
    md += ["", "| model | step time | images/s |", "|---|---|---|",
           f"| LexVLA | {t_lex * 1000:.0f} ms | {b / t_lex:.1f} |", f"| dense baseline | {t_dense * 1000:.0f} ms | {b / t_dense:.1f} |"]
    named = {"adapter": rows_t(rows, "vision: adapter"), "LoRA layers": rows_t(rows, "text: LoRA"),
             "lexical head, image": rows_t(rows, "lexical head, image: fused max-pool + "),
             "lexical head, text": rows_t(rows, "lexical head, text"), "loss": rows_t(rows, "loss:"), "optimiser": t_opt}
    md += ["", "Each part's share of the LexVLA step (parts timed alone; the rest is autograd glue, norms and the "
           "dense-free remainder of the forward):", "", "| part | share of the step |", "|---|---|"]
    md += [f"| {k} | {v / t_lex:.0%} |" for k, v in named.items()]
    md += [f"| rest | {1 - sum(named.values()) / t_lex:.0%} |"]
    md += ["", *extra]
    text = "\n".join(md) + "\n"
    print(text)
    if a.out == "auto":
        a.out = f"benchmarks/results/train_{'gpu' if dev.type == 'cuda' else kind_slug(cpu_bf16_flags())}.md"
    if a.out != "-":
        Path(a.out).parent.mkdir(parents=True, exist_ok=True); Path(a.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
