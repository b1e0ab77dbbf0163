"""One training step of the paper-scale LexVLA on one GPU, with random weights (nothing downloaded).

    python benchmarks/bench_gpu.py [--batches 16 32 64 128] [--layers 32] [--budget-s 480] [--out benchmarks/results/gpu.md]
    python benchmarks/bench_gpu.py --shapes tiny --device cpu      # the same code at tiny shapes (tested in CI)

The step is the one `lexvla.train` runs with the `paper` preset: a frozen DINOv2 ViT-L/14 at 224 px (timm, random
init), the adapter (self-attention block + MLP to 4096), the trainable visual codebook (V x 4096) and the fused
patch x vocabulary max-pool; Llama-2-7b's architecture (transformers, random init, bf16) frozen with LoRA r=8 on
every linear layer of every block and gradient checkpointing, its frozen LM-head rows as the text codebook; InfoNCE +
overuse penalty; AdamW on the trainable weights. bf16 autocast as in training.

For each batch size that fits: step time, images/s, peak memory, and model FLOPs utilisation (MFU) against the bf16
matmul peak this script measures itself on the same device (a large square matmul). Model FLOPs per step count the
work a step must do: LM forward 2NT + input-gradient backward 2NT (frozen weights: no weight gradients) + the
gradient-checkpointing recompute is NOT counted (it is overhead); ViT forward only (frozen); adapter, codebook and
the adapter 6NT; the max-pool's patch x vocabulary product forward (its backward is sparse).
"""
from __future__ import annotations

import argparse
import datetime
import math
import sys
import time
from pathlib import Path

import torch

SHAPES = {
    #          ViT (timm name, img, patch)           LM (width, ffn, layers, heads, vocab)  V kept   tokens/caption
    "paper": dict(vit="vit_large_patch14_dinov2", vit_kw={}, img=224, patch=14, d=4096, ffn=11008, layers=32, heads=32, vocab=32000, V=17149, tokens=48),
    "tiny": dict(vit="vit_small_patch14_dinov2", vit_kw=dict(embed_dim=48, depth=2, num_heads=3), img=32, patch=8, d=64, ffn=128, layers=2, heads=4, vocab=512, V=300, tokens=12),
}


def build(shapes: dict, device: torch.device, grad_ckpt: bool):
    import timm
    from transformers import LlamaConfig, LlamaForCausalLM
    from lexvla.params import LoraParams
    from lexvla.text import apply_lora
    from lexvla.vision import Adapter
    dt = torch.bfloat16 if device.type == "cuda" else torch.float32
    vit = timm.create_model(shapes["vit"], pretrained=False, img_size=shapes["img"], patch_size=shapes["patch"],
                            num_classes=0, **shapes["vit_kw"])
    vit = vit.to(device, dt).eval().requires_grad_(False)
    cfg = LlamaConfig(hidden_size=shapes["d"], intermediate_size=shapes["ffn"], num_hidden_layers=shapes["layers"],
                      num_attention_heads=shapes["heads"], num_key_value_heads=shapes["heads"], vocab_size=shapes["vocab"],
                      max_position_embeddings=4096)
    with torch.device(device):
        lm = LlamaForCausalLM(cfg).to(dt).eval().requires_grad_(False)
    apply_lora(lm, LoraParams(rank=8, alpha=16.0, dropout=0.05, target_modules=["all-linear"], layers=None))
    if grad_ckpt: lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lm.train()
    ids = torch.randperm(shapes["vocab"])[:shapes["V"]].sort().values.to(device)
    text_codebook = lm.get_output_embeddings().weight[ids].detach().clone()
    adapter = Adapter(vit.embed_dim, shapes["d"], heads=max(1, shapes["d"] // 256), mlp_ratio=4.0).to(device)
    visual_codebook = torch.nn.Parameter(text_codebook.float().clone())
    logit_scale = torch.nn.Parameter(torch.tensor(math.log(1 / 0.07), device=device))
    return vit, lm, adapter, visual_codebook, text_codebook, logit_scale


def count(module, trainable=None) -> int:
    return sum(p.numel() for p in module.parameters() if trainable is None or p.requires_grad == trainable)


def matmul_peak(device: torch.device, n: int) -> float:
    "Measured FLOP/s of an n x n x n matmul (bf16 on CUDA, fp32 on CPU)."
    dt = torch.bfloat16 if device.type == "cuda" else torch.float32
    a, b = torch.randn(n, n, device=device, dtype=dt), torch.randn(n, n, device=device, dtype=dt)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(3): a @ b
    sync(); reps = 20 if device.type == "cuda" else 3
    t = time.perf_counter()
    for _ in range(reps): a @ b
    sync()
    return 2 * n ** 3 * reps / (time.perf_counter() - t)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", choices=list(SHAPES), default="paper")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batches", type=int, nargs="+", default=[16, 32, 64, 128, 256])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--no-grad-ckpt", action="store_true")
    ap.add_argument("--layers", type=int, default=None, help="LM decoder layers (default: the shape's, 32 for 7B); "
                    "fewer make a faster, stated approximation (MFU counts the layers that run)")
    ap.add_argument("--budget-s", type=float, default=480.0, help="no larger batch is tried once this much wall "
                    "time has passed (the whole run stays under 10 minutes on one GPU)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    from einops import reduce
    from lexvla.losses import create_loss, elu1p
    from lexvla.maxpool import lexical_maxpool
    from lexvla.model import l2norm

    t_begin = time.perf_counter()
    device, S = torch.device(a.device), dict(SHAPES[a.shapes])
    if a.layers is not None: S["layers"] = a.layers
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    torch.manual_seed(0)
    vit, lm, adapter, Zi, Zt, ls = build(S, device, not a.no_grad_ckpt)
    loss_fn = create_loss("overuse", lambda_img=1e-3, lambda_txt=1e-3, warmup_steps=0)
    params = [p for p in [*adapter.parameters(), Zi, ls] if p.requires_grad] + [p for p in lm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    n_lm, n_vit = count(lm, trainable=False), count(vit)
    n_train = sum(p.numel() for p in params)
    n_patches = (S["img"] // S["patch"]) ** 2
    peak = matmul_peak(device, 8192 if cuda else 512)
    print(f"{a.shapes}: ViT {n_vit / 1e6:.0f} M frozen, LM {n_lm / 1e6:.0f} M frozen, trainable {n_train / 1e6:.1f} M; "
          f"matmul peak {peak / 1e12:.1f} TFLOP/s", file=sys.stderr)

    def step(b):
        pixels = torch.randn(b, 3, S["img"], S["img"], device=device)
        ids = torch.randint(0, S["vocab"], (b, S["tokens"]), device=device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            with torch.no_grad():
                tokens = vit.forward_features(pixels)[:, vit.num_prefix_tokens:]
            h = adapter(tokens.float())
            img = l2norm(elu1p(lexical_maxpool(h, Zi)[0]))
            hid = lm.model(input_ids=ids).last_hidden_state[:, -1]
            txt = l2norm(elu1p(hid.float() @ Zt.float().T))
            loss = loss_fn(img, txt, ls.exp().clamp(max=100), None)["loss"]
        loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)

    def flops(b):
        T = b * S["tokens"]
        lm_f = 4 * n_lm * T                              # forward + input-gradient backward of the frozen LM
        vit_f = 2 * n_vit * b * n_patches                # frozen ViT: forward only
        head_f = 2 * b * n_patches * S["V"] * S["d"]     # patch x vocabulary product (forward; sparse backward)
        adapter_f = 6 * count(adapter) * b * n_patches   # the adapter runs on every patch, trained
        return lm_f + vit_f + head_f + adapter_f

    rows = []
    for b in a.batches:
        if time.perf_counter() - t_begin > a.budget_s:
            print(f"batch {b}: skipped, the {a.budget_s:.0f} s budget is spent", file=sys.stderr)
            break
        try:
            if cuda: torch.cuda.empty_cache(); torch.cuda.reset_peak_memory_stats()
            step(b); sync()
            best = float("inf")
            for _ in range(a.reps):
                t = time.perf_counter(); step(b); sync(); best = min(best, time.perf_counter() - t)
            mem = torch.cuda.max_memory_allocated() if cuda else float("nan")
            mfu = flops(b) / best / peak
            rows.append((b, best, b / best, mem, mfu))
            print(f"batch {b}: {best:.3f} s/step, {b / best:.1f} img/s, peak {mem / 2**30:.1f} GiB, MFU {mfu:.1%}", file=sys.stderr)
        except torch.OutOfMemoryError:
            rows.append((b, None, None, None, None)); print(f"batch {b}: out of memory", file=sys.stderr)
            opt.zero_grad(set_to_none=True)
            break
    name = torch.cuda.get_device_name(0) if cuda else f"CPU ({torch.get_num_threads()} threads)"
    md = [f"# Benchmark: one paper-scale training step on one GPU\n",
          f"`python benchmarks/bench_gpu.py --shapes {a.shapes}` ({datetime.date.today().isoformat()}, {name}, torch "
          f"{torch.__version__}). Random weights; LM {S['layers']} decoder layers. ViT {n_vit / 1e6:.0f} M (frozen), LM {n_lm / 1e6:.0f} M (frozen, LoRA on "
          f"every block{', gradient checkpointing' if not a.no_grad_ckpt else ''}), {n_train / 1e6:.1f} M trainable; "
          f"V = {S['V']}, {n_patches} patches, {S['tokens']} tokens per caption. Matmul peak measured here: "
          f"{peak / 1e12:.1f} TFLOP/s ({'bf16' if cuda else 'fp32'}).\n",
          "| batch | step time | images/s | peak memory | MFU |", "|---|---|---|---|---|"]
    for b, t, ips, mem, mfu in rows:
        md.append(f"| {b} | out of memory | | | |" if t is None else
                  f"| {b} | {t:.3f} s | {ips:.1f} | {'-' if mem != mem else f'{mem / 2**30:.1f} GiB'} | {mfu:.1%} |")
    text = "\n".join(md) + "\n"
    print(text)
    if a.out: Path(a.out).parent.mkdir(parents=True, exist_ok=True); Path(a.out).write_text(text)
    return 0 if any(r[1] is not None for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
