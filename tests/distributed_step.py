"""One training step of the tiny model in each of N processes (launched by tests/test_distributed.py with
`accelerate launch --multi_gpu --num_processes 2`, gloo on the CPU), against the same step of one process holding the
whole batch. Each process trains on its B/N rows through `lexvla.trainstep.train_step` with the gathered loss; process 0
then runs the 1 x B step on a fresh copy of the model and writes both losses and every gradient's difference to JSON.

    python -m accelerate.commands.launch --multi_gpu --num_processes 2 tests/distributed_step.py OUT.json [--local-loss]
"""
import json
import sys
from types import SimpleNamespace

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs

from lexvla.losses import create_loss
from lexvla.model import create_model
from lexvla.text import TINY_WORDS
from lexvla.trainstep import StepContext, make_optimizer, regularised, train_step

B = 8
out_path, local_loss = sys.argv[1], "--local-loss" in sys.argv
acc = Accelerator(cpu=True, kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)])
rank, n = acc.process_index, acc.num_processes
g = torch.Generator().manual_seed(0)
pixels = torch.randn(B, 3, 32, 32, generator=g)
words = [w for w in TINY_WORDS if w.isalpha()]
captions = [" ".join(words[int(i)] for i in torch.randint(len(words), (5,), generator=g)) for _ in range(B)]
tp = SimpleNamespace(grad_clip=0.0, reg_on="max", weight_decay=0.0, codebook_weight_decay=0.0, lr=1e-3,
                     warmup_steps=1, steps=10)
loss_fn = create_loss("overuse", lambda_img=0.5, lambda_txt=0.5, warmup_steps=0, local_loss=local_loss)


def grads(model):
    return {k: p.grad.detach().clone() for k, p in model.named_parameters() if p.requires_grad and p.grad is not None}


model = create_model("tiny", seed=0)
opt, sched = make_optimizer(model, tp)
model, opt = acc.prepare(model, opt)
rows = slice(rank * B // n, (rank + 1) * B // n)
batch = {"pixels": pixels[rows], "captions": captions[rows], "keys": []}
captured = {}
# the gradients as the optimiser would see them (after DDP's average); no update is applied
opt.step = lambda *a, **k: captured.update(grads(acc.unwrap_model(model)))
out, parts = train_step(model, batch, 0, StepContext(loss_fn, acc, opt, sched, tp))
dist_grads = captured
loss = acc.reduce(parts["loss"].detach(), "mean")  # local_loss: each process has its part; global: all the same
buffers_broadcast = bool(getattr(model, "broadcast_buffers", False))
if rank == 0:
    ref = create_model("tiny", seed=0)
    ref_out = ref(pixels=pixels, captions=captions)
    ref_parts = create_loss("overuse", lambda_img=0.5, lambda_txt=0.5, warmup_steps=0, gather=False)(
        ref_out["image_features"], ref_out["text_features"], ref_out["logit_scale"], 0, **regularised(ref_out, "max"))
    ref_parts["loss"].backward()
    ref_grads = grads(ref)
    diff = {k: float((dist_grads[k] - v).abs().max()) for k, v in ref_grads.items()}
    scale = {k: float(v.abs().max()) for k, v in ref_grads.items()}
    json.dump({"processes": n, "loss": float(loss), "ref_loss": float(ref_parts["loss"].detach()),
               "grad_max_diff": diff,
               "grad_max": scale, "missing": sorted(set(ref_grads) - set(dist_grads)),
               "broadcast_buffers": buffers_broadcast}, open(out_path, "w"), indent=1)
acc.wait_for_everyone()
