"""What 8 GPUs would break and 2 gloo processes on the CPU can show (issue 23), one phase per launch:

- `resume`: process 0 writes a checkpoint whose optimiser state is tagged `cuda:0` (as on a GPU); every process
  resumes it (`Checkpointer.load` must not restore it where it was saved: here there is no CUDA at all);
- `nonfinite`: process 1 alone gets a NaN loss (as with `train.local_loss`); both must raise `NonFiniteLoss`,
  none may wait in backward's all-reduce;
- `checkpoint`: process 0's checkpoint write fails; both must raise `CheckpointError`;
- `rng`: after the training seeding and the model build, each process's torch stream is its own, and the build did
  not reseed the CUDA generators (which would give every GPU one dropout stream).

    python -m accelerate.commands.launch --multi_gpu --num_processes 2 tests/distributed_failures.py PHASE OUT_DIR
Each process writes OUT_DIR/PHASE-RANK.json.
"""
import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs

from lexvla.losses import create_loss
from lexvla.model import create_model
from lexvla.runtime import seed_everything
from lexvla.text import TINY_WORDS
from lexvla.checkpoints import Checkpointer, CheckpointError
from lexvla.train import resume
from lexvla.trainstep import NonFiniteLoss, StepContext, make_optimizer, train_step

phase, out_dir = sys.argv[1], Path(sys.argv[2])
acc = Accelerator(cpu=True, kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)])
rank, n = acc.process_index, acc.num_processes
result = {"rank": rank, "processes": n}
B = 4
tp = SimpleNamespace(grad_clip=0.0, reg_on="max", weight_decay=0.0, codebook_weight_decay=0.0, lr=1e-3,
                     warmup_steps=1, steps=10)
seed_everything(0 + rank)
reseeded = []
real = torch.cuda.manual_seed_all
torch.cuda.manual_seed_all = lambda s: (reseeded.append(s), real(s))
model = create_model("tiny", seed=0)
torch.cuda.manual_seed_all = real
result["draw"] = torch.rand(4).tolist()  # after the build: each process's own stream
result["cuda_reseeded_by_build"] = reseeded
g = torch.Generator().manual_seed(0)
pixels = torch.randn(n * B, 3, 32, 32, generator=g)
words = [w for w in TINY_WORDS if w.isalpha()]
captions = [" ".join(words[int(i)] for i in torch.randint(len(words), (5,), generator=g)) for _ in range(n * B)]
batch = {"pixels": pixels[rank * B:(rank + 1) * B], "captions": captions[rank * B:(rank + 1) * B], "keys": []}
loss_fn = create_loss("overuse", lambda_img=0.5, lambda_txt=0.5, warmup_steps=0, local_loss=True)
opt, sched = make_optimizer(model, tp)
model, opt = acc.prepare(model, opt)
raw = acc.unwrap_model(model)


def outcome(fn):
    "What `fn()` did on this process: ok, or the type and message of what it raised."
    try:
        fn()
        return {"raised": None}
    except (NonFiniteLoss, CheckpointError) as e:
        return {"raised": type(e).__name__, "message": str(e)}


if phase == "rng":
    pass
elif phase == "nonfinite":
    def nan_on_1(step, parts):
        if rank == 1: parts["loss"] = parts["loss"] * float("nan")
    nan_step = StepContext(loss_fn, acc, opt, sched, tp, loss_hook=nan_on_1)
    result.update(outcome(lambda: train_step(model, batch, 0, nan_step)))
elif phase in ("resume", "checkpoint"):
    from lexvla.train import save_checkpoint
    train_step(model, batch, 0, StepContext(loss_fn, acc, opt, sched, tp))
    ck = Checkpointer(out_dir / "ck", "fp")
    if phase == "checkpoint":
        if rank == 0:
            def broken(*a, **k): raise CheckpointError("disk full (simulated)")
            ck.save = broken
        result.update(outcome(lambda: save_checkpoint(acc, ck, 1, raw, opt, sched, {"epoch": 0, "batch_in_epoch": 1})))
    else:
        # tag every storage that torch.save writes as cuda:0, as a GPU run's optimiser state is
        tag = {"on": False}
        torch.serialization.register_package(1, lambda obj: "cuda:0" if tag["on"] else None, lambda obj, loc: None)
        save = ck.save

        def save_tagged(*a, **k):
            tag["on"] = True
            try: return save(*a, **k)
            finally: tag["on"] = False
        ck.save = save_tagged
        save_checkpoint(acc, ck, 1, raw, opt, sched, {"epoch": 0, "batch_in_epoch": 1})
        with torch.no_grad(): raw.logit_scale.add_(1.0)
        try:
            got = resume(ck, raw, opt, sched, 10, say=lambda s: None, rank=rank)
            result.update(resumed=list(got[:3]), error=None, logit_scale=float(raw.logit_scale))
            result["state_devices"] = sorted({str(t.device) for s in opt.state_dict()["state"].values()
                                              for t in s.values() if torch.is_tensor(t)})
        except Exception as e:  # the old code: torch.load restores to cuda:0, which is not there
            result.update(resumed=None, error=f"{type(e).__name__}: {e}")
acc.wait_for_everyone()  # a process still stuck in a collective would never get here
result["finished"] = True
(out_dir / f"{phase}-{rank}.json").write_text(json.dumps(result))
# the results are on disk. The failure phases leave DDP's reducer and gloo mid-collective on purpose (one process
# skipped an all-reduce), and their C++ teardown at interpreter exit (or in destroy_process_group) then sometimes
# aborts ("terminate called without an active exception", exit -6) after the work was done: leave without it
sys.stdout.flush(); sys.stderr.flush()
os._exit(0)
