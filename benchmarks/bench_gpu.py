"""One training step of the paper-scale LexVLA on one GPU: the real `lexvla.trainstep.train_step`, random weights.

    python benchmarks/bench_gpu.py [--batches 16 32 64 128 256] [--layers 32] [--budget-s 480] [--out FILE.md]
    python benchmarks/bench_gpu.py --shapes tiny --device cpu      # the same code at tiny shapes (tested in CI)

The model is `lexvla.model.LexVLA` built from the `paper` preset (profiles/paper.yaml's model) with random weights:
frozen DINOv2 ViT-L/14 at 224 px in fp32 (as training keeps it), the adapter and the trainable visual codebook,
the fused patch x vocabulary max-pool, Llama-2-7b's architecture (transformers config written here, random init,
bf16, LoRA r=8 on every linear layer of every block, gradient checkpointing), its frozen LM-head rows as the text
codebook. Nothing is downloaded: Llama 2's tokenizer is replaced by a word-level one of the same size (32,000
pieces) whose alphabetic pieces are exactly the 23,964 that `alpha2` keeps on Llama 2's (V as in training). The
captions are drawn so that their token counts look like CC-12M's: most are short, and the longest of a batch reach
`model.max_text_tokens` (77), i.e. 88 tokens with the prompt, so each batch carries the padding training carries
(the table reports the padded and the real token counts). The step is the training loop's: `accelerate`
(bf16 autocast on CUDA), the paper profile's loss (InfoNCE + overuse penalty with its `reg_on` and share), AdamW
with its parameter groups, clipping, the scheduler.

Not measured here: DDP (one GPU: its gradient buckets add about the trainable weights' size in fp32, ~0.45 GB),
the data loader, the gathered negatives of 8 processes (the loss's all-gather of b x V features per process).

For each batch size that fits: step time, images/s, peak memory, and model FLOPs utilisation (MFU) against the bf16
matmul peak this script measures itself on the same device (a large square matmul). Model FLOPs per step count the
work a step must do on the padded batch: LM forward 2NT + input-gradient backward 2NT (frozen weights: no weight
gradients; the gradient-checkpointing recompute is NOT counted, it is overhead); ViT forward only (frozen); the
adapter 6NT; the max-pool's patch x vocabulary product forward (its backward is sparse).
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {
    # preset: the model preset; lm: the LlamaConfig written here; vocab: the tokenizer size, of which `kept` pieces are
    # alphabetic (what alpha2 keeps); words: caption length in words (median, longest)
    "paper": dict(preset="paper", lm=dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                          num_attention_heads=32, num_key_value_heads=32),
                  vocab=32000, kept=23964, words=(24, 77), model={}),
    "tiny": dict(preset="tiny", lm=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2),
                 vocab=512, kept=300, words=(6, 20),
                 model={"lora": {"layers": None}, "vocab": {"filter": "alpha2"}}),  # as the paper preset
}
PROMPT_WORDS = ("This", "sentence", "means", "in", "one", "word")


def alpha_piece(i: int) -> str:
    "The i-th alphabetic piece of length >= 2: aa, ab, ..., zz, aaa, ..."
    n, s = 2, i
    while s >= 26 ** n: s, n = s - 26 ** n, n + 1
    return "".join(chr(97 + (s // 26 ** k) % 26) for k in reversed(range(n)))


def write_lm_folder(folder: Path, S: dict, layers: int | None) -> list[str]:
    "A transformers folder: Llama config of the shape (no weights) + a word-level tokenizer; returns its caption words."
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, PreTrainedTokenizerFast
    words, i, taken = [], 0, {w.lower() for w in PROMPT_WORDS}
    while len(words) < S["kept"] - len(PROMPT_WORDS):
        if alpha_piece(i) not in taken: words.append(alpha_piece(i))
        i += 1
    pieces = ["<unk>", "<s>", "</s>", ":", '"', *PROMPT_WORDS, *words]
    pieces += [f"{i}" for i in range(S["vocab"] - len(pieces))]  # digits: dropped by every vocabulary filter
    tk = Tokenizer(models.WordLevel({p: i for i, p in enumerate(pieces)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), pre_tokenizers.Punctuation()])
    PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                            pad_token="</s>").save_pretrained(folder)
    lm = dict(S["lm"], **({"num_hidden_layers": layers} if layers else {}))
    LlamaConfig(vocab_size=S["vocab"], max_position_embeddings=4096, bos_token_id=1, eos_token_id=2,
                tie_word_embeddings=False, **lm).save_pretrained(folder)
    return words


def captions(words: list[str], b: int, S: dict, g: torch.Generator) -> list[str]:
    "b captions with CC-12M-like lengths: log-normal around the median, the longest of the batch at the cut."
    med, top = S["words"]
    n = (torch.randn(b, generator=g) * 0.6).exp().mul(med).round().clamp(3, top).long()
    n[0] = top  # alt-text: some caption of every large batch is cut at max_text_tokens
    return [" ".join(words[int(i)] for i in torch.randint(len(words), (int(k),), generator=g)) for k in n]


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


def paper_train_params() -> SimpleNamespace:
    "The train section of params.yaml + profiles/paper.yaml (loss, optimiser, clipping), as train_step reads it."
    from lexvla.params import apply_profile
    return SimpleNamespace(**apply_profile(ROOT / "profiles" / "paper.yaml", ROOT / "params.yaml")["train"])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", choices=list(SHAPES), default="paper")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batches", type=int, nargs="+", default=[16, 32, 64, 128, 256])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--layers", type=int, default=None, help="LM decoder layers (default: the shape's, 32 for 7B); "
                    "fewer make a faster, stated approximation (MFU counts the layers that run)")
    ap.add_argument("--budget-s", type=float, default=480.0, help="no larger batch is tried once this much wall "
                    "time has passed (the whole run stays under 10 minutes on one GPU)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--json", default=None, help="also write the rows as JSON")
    a = ap.parse_args(argv)
    from accelerate import Accelerator

    from lexvla.losses import create_loss
    from lexvla.model import LexVLA
    from lexvla.params import model_config
    from lexvla.trainstep import StepContext, make_optimizer, train_step

    t_begin = time.perf_counter()
    device, S = torch.device(a.device), SHAPES[a.shapes]
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    tp = paper_train_params()
    folder = Path(tempfile.mkdtemp(prefix="bench-gpu-lm-"))
    words = write_lm_folder(folder, S, a.layers)
    lm = {"source": "hf", "path": str(folder), "converted": None, "pretrained": False}
    if not cuda: lm["dtype"] = "float32"  # CPU: no bf16 matmuls to speak of
    cfg = model_config(S["preset"], lm=lm, vision={"pretrained": False, "checkpoint": None}, **S["model"])
    acc = Accelerator(cpu=not cuda, mixed_precision="bf16" if cuda else "no")
    torch.manual_seed(0)
    model = LexVLA(cfg, "lexvla", seed=0)
    n_layers, V = model.n_layers, model.vocab.size
    spec = tp.variants["lexvla"]
    loss_fn = create_loss(spec["reg"], lambda_img=tp.lambda_img, lambda_txt=tp.lambda_txt,
                          warmup_steps=tp.reg_warmup_steps, local_loss=tp.local_loss, settings=spec.get("settings"))
    opt, sched = make_optimizer(model, tp)
    model, opt = acc.prepare(model, opt)
    raw = acc.unwrap_model(model)
    count = lambda m, trainable=None: sum(p.numel() for p in m.parameters()
                                          if trainable is None or p.requires_grad == trainable)
    n_lm, n_vit, n_train = count(raw.lm, trainable=False), count(raw.vision), count(raw, trainable=True)
    n_patches = raw.vision.patch_embed.num_patches
    peak = matmul_peak(device, 8192 if cuda else 512)
    print(f"{a.shapes}: ViT {n_vit / 1e6:.0f} M frozen, LM {n_lm / 1e6:.0f} M frozen ({n_layers} layers), trainable "
          f"{n_train / 1e6:.1f} M, V = {V}; matmul peak {peak / 1e12:.1f} TFLOP/s", file=sys.stderr)
    g = torch.Generator().manual_seed(0)
    model.train()

    def step(b, k):
        batch = {"pixels": torch.randn(b, 3, *raw.data_config["input_size"][1:], generator=g),
                 "captions": captions(words, b, S, g), "keys": []}
        lengths = raw.tokenize(batch["captions"])["attention_mask"].sum(-1)
        train_step(model, batch, k, StepContext(loss_fn, acc, opt, sched, tp))
        groups = lengths.sort().values.tensor_split(min(tp.text_buckets, b))  # what the LM runs (train.text_buckets)
        return sum(len(x) * int(x.max()) for x in groups), int(lengths.sum()), b * int(lengths.max())

    def flops(b, padded):
        lm_f = 4 * n_lm * padded                          # forward + input-gradient backward of the frozen LM
        vit_f = 2 * n_vit * b * n_patches                 # frozen ViT: forward only
        head_f = 2 * b * n_patches * V * raw.width        # patch x vocabulary product (forward; sparse backward)
        adapter_f = 6 * count(raw.adapter) * b * n_patches  # the adapter runs on every patch, trained
        return lm_f + vit_f + head_f + adapter_f

    rows, k = [], 0
    for b in a.batches:
        if time.perf_counter() - t_begin > a.budget_s:
            print(f"batch {b}: skipped, the {a.budget_s:.0f} s budget is spent", file=sys.stderr)
            break
        try:
            if cuda: torch.cuda.empty_cache(); torch.cuda.reset_peak_memory_stats()
            step(b, k); sync(); k += 1
            best, toks = float("inf"), (0, 0, 0)
            for _ in range(a.reps):
                t = time.perf_counter(); toks = step(b, k); sync(); k += 1
                best = min(best, time.perf_counter() - t)
            mem = torch.cuda.max_memory_allocated() if cuda else float("nan")
            mfu = flops(b, toks[0]) / best / peak
            rows.append(dict(batch=b, step_s=best, images_s=b / best, peak_bytes=mem, mfu=mfu,
                             tokens_run=toks[0] / b, tokens_real=toks[1] / b, tokens_padded=toks[2] / b))
            print(f"batch {b}: {best:.3f} s/step, {b / best:.1f} img/s, peak {mem / 2**30:.1f} GiB, MFU {mfu:.1%}, "
                  f"tokens per caption: {toks[0] / b:.1f} run, {toks[1] / b:.1f} real, {toks[2] / b:.0f} padded",
                  file=sys.stderr)
        except torch.OutOfMemoryError:
            rows.append(dict(batch=b, step_s=None)); print(f"batch {b}: out of memory", file=sys.stderr)
            opt.zero_grad(set_to_none=True)
            break
    name = torch.cuda.get_device_name(0) if cuda else f"CPU ({torch.get_num_threads()} threads)"
    md = [f"# Benchmark: one paper-scale training step on one GPU\n",
          f"`python benchmarks/bench_gpu.py --shapes {a.shapes}` ({datetime.date.today().isoformat()}, {name}, torch "
          f"{torch.__version__}). The real `train_step` on random weights; LM {n_layers} decoder layers. ViT "
          f"{n_vit / 1e6:.0f} M (frozen, fp32), LM {n_lm / 1e6:.0f} M (frozen, {cfg.lm.dtype}, LoRA on every block"
          f"{', gradient checkpointing' if cfg.grad_checkpointing else ''}), {n_train / 1e6:.1f} M trainable; V = {V}, "
          f"{n_patches} patches; loss {spec['reg']} (reg_on {tp.reg_on}). One process, no DDP. Matmul peak measured "
          f"here: {peak / 1e12:.1f} TFLOP/s ({'bf16' if cuda else 'fp32'}).\n",
          f"Text tower in {tp.text_buckets} length groups (train.text_buckets): tokens per caption that the LM runs, "
          "that are real, and that one padded batch would run.\n",
          "| batch | step time | images/s | peak memory | MFU | tokens/caption (run / real / one padded batch) |",
          "|---|---|---|---|---|---|"]
    for r in rows:
        mem = r.get("peak_bytes")
        md.append(f"| {r['batch']} | out of memory | | | | |" if r["step_s"] is None else
                  f"| {r['batch']} | {r['step_s']:.3f} s | {r['images_s']:.1f} | "
                  f"{'-' if mem != mem else f'{mem / 2**30:.1f} GiB'} | {r['mfu']:.1%} | "
                  f"{r['tokens_run']:.1f} / {r['tokens_real']:.1f} / {r['tokens_padded']:.0f} |")
    text = "\n".join(md) + "\n"
    print(text)
    if a.out: Path(a.out).parent.mkdir(parents=True, exist_ok=True); Path(a.out).write_text(text)
    if a.json: Path(a.json).write_text(json.dumps(rows, indent=1))
    return 0 if any(r["step_s"] is not None for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
