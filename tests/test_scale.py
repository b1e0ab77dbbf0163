"""Paper scale, second pass (issue 23): what 8 GPUs, Llama-2-7B and CC-12M would break, checked at tiny sizes.

The multi-process checks run tests/distributed_failures.py under `accelerate launch` with 2 gloo processes."""
import json

import pytest
import torch
from conftest import ROOT, run

from lexvla.train import launch_command


def _launch(tmp_path, phase: str, timeout: int = 240) -> list[dict]:
    "Run one phase of tests/distributed_failures.py in 2 processes; each process's JSON."
    cmd = launch_command([], 2)
    cmd = cmd[:cmd.index("-m", 3)] + [str(ROOT / "tests" / "distributed_failures.py"), phase, str(tmp_path)]
    run(cmd, cwd=tmp_path, timeout=timeout)
    return [json.loads((tmp_path / f"{phase}-{r}.json").read_text()) for r in range(2)]


def test_resume_loads_checkpoints_onto_the_cpu(tmp_path):
    "A checkpoint written from cuda:0 resumes on every process (old code: torch.load put it back on cuda:0)."
    r = _launch(tmp_path, "resume")
    for x in r:
        assert x["error"] is None, x["error"]
        assert x["resumed"] == [1, 0, 1] and x["state_devices"] == ["cpu"]
    assert r[0]["logit_scale"] == r[1]["logit_scale"]


def test_one_process_nonfinite_loss_stops_both(tmp_path):
    "A NaN loss on process 1 alone: both raise NonFiniteLoss (old code: process 0 waited in backward's all-reduce)."
    r = _launch(tmp_path, "nonfinite", timeout=180)
    assert [x["raised"] for x in r] == ["NonFiniteLoss", "NonFiniteLoss"]
    assert "process 1 failed" in r[0]["message"] and "non-finite loss at step 0" in r[1]["message"]


def test_checkpoint_error_on_process_0_stops_both(tmp_path):
    r = _launch(tmp_path, "checkpoint", timeout=180)
    assert [x["raised"] for x in r] == ["CheckpointError", "CheckpointError"]
    assert "disk full" in r[0]["message"] and "process 0 failed" in r[1]["message"]


def test_each_process_has_its_own_rng_stream(tmp_path):
    "After seeding (seed + rank) and the model build, the streams differ, and the build left the CUDA seeds alone."
    r = _launch(tmp_path, "rng")
    assert r[0]["draw"] != r[1]["draw"]
    assert r[0]["cuda_reseeded_by_build"] == [] and r[1]["cuda_reseeded_by_build"] == []


def test_model_build_does_not_reseed_cuda(monkeypatch):
    "`torch.manual_seed` in the build reseeded every CUDA generator: one dropout stream for all GPUs (old code)."
    from lexvla.model import create_model
    calls = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda s: calls.append(s))
    a = create_model("tiny", seed=0)
    assert calls == []
    b = create_model("tiny", seed=0)  # still seeded: the same weights
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


@pytest.mark.parametrize("shift", ["none", "mean", "lse"])
def test_image_weights_are_the_max_of_patch_weights(shift):
    "PatchDis's patch vectors and the image vector come from one P (method §4); old code: a per-patch mean shift."
    from lexvla.model import LexVLA, l2norm
    from lexvla.params import model_config
    m = LexVLA(model_config("tiny", logit_shift={"text": shift, "image": shift, "bias_scale": 100.0}))
    with torch.no_grad():
        m.logit_bias.fill_(-0.01)
        px = torch.randn(2, 3, 32, 32)
        torch.testing.assert_close(m.patch_weights(px).amax(1), m.image_weights(px), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(m.encode_image_patches(px), l2norm(m.patch_weights(px)))


def test_augmentation_follows_the_image_cache(tmp_path, monkeypatch):
    "A frozen ViT without the image cache (the paper profile) trains on augmented views (old code: centre crops)."
    import lexvla.train as T
    from test_pipeline import tiny_params

    from lexvla.params import params_from_dict
    p = tiny_params(variants=("lexvla",))
    p["train"].update(image_cache=False, text_cache=False)
    (tmp_path / "data" / "train").mkdir(parents=True)
    (tmp_path / "data" / "train" / "00000.tar").write_bytes(b"")  # never read: the run stops at the transform
    seen = []

    class Stop(Exception): pass

    def transform(cfg, train=False, **kw):
        seen.append(train)
        raise Stop

    import lexvla.batches as B
    monkeypatch.setattr(B, "image_transform", transform)  # the batch sources build the training transform
    with pytest.raises(Stop):
        T.train(params_from_dict(p), "lexvla", data_dir=tmp_path / "data", out_dir=tmp_path / "out",
                results_dir=tmp_path / "res", progress=False)
    assert seen == [True]


def test_textcache_runs_on_the_device_and_skips_an_embedding_lookup(tmp_path, monkeypatch):
    "LoRA on every block (the paper profile): no frozen layer, so no cache; the model goes to base.device first."
    import lexvla.textcache as TC
    from test_pipeline import tiny_params

    from lexvla.caches import TextPrefixCache
    from lexvla.params import params_from_dict
    p = tiny_params(variants=("lexvla",))
    p["model"]["lora"] = {"layers": None}  # merged over the tiny preset: LoRA on every block
    moved, real = [], TC.create_model_from_params

    def spy(*a, **k):
        m = real(*a, **k)
        to = m.to
        m.to = lambda *x, **y: (moved.append(x), to(*x, **y))[1]
        return m

    monkeypatch.setattr(TC, "create_model_from_params", spy)
    TC.build(params_from_dict(p), data_dir=tmp_path / "no-data", out=tmp_path / "tc", progress=False)
    assert moved == [("cpu",)]
    for part in ("train", "eval/seen", "eval/unseen"):
        c = TextPrefixCache.load(tmp_path / "tc" / part)
        assert len(c) == 0 and "every block" in c.meta["disabled"]


def test_hub_weights_get_dinov2_position_resampling(tmp_path, monkeypatch):
    "Hub weights (pretrained, no local checkpoint: the paper profile) are resampled without antialiasing, as DINOv2."
    import timm
    from safetensors.torch import save_file
    from timm.layers import resample_abs_pos_embed

    from lexvla.params import model_config
    from lexvla.vision import create_vision
    arch = dict(patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=0)
    native = timm.create_model("vit_small_patch14_reg4_dinov2", pretrained=False, **arch)  # 518 px: a 64 x 64 grid
    with torch.no_grad(): native.pos_embed.normal_()  # high frequencies: antialiasing changes them visibly
    f = tmp_path / "hub.safetensors"
    save_file({k: v.contiguous() for k, v in native.state_dict().items()}, str(f))
    real = timm.create_model

    def hub(name, pretrained=False, **kw):  # the hub, served from the stand-in file (no network)
        if pretrained: kw.setdefault("pretrained_cfg_overlay", {"file": str(f)})
        return real(name, pretrained=pretrained, **kw)

    monkeypatch.setattr(timm, "create_model", hub)
    v = model_config("tiny", vision={"pretrained": True, "checkpoint": None, "img_size": 64}).vision
    vit = create_vision(v)
    want = {aa: resample_abs_pos_embed(native.pos_embed.detach(), new_size=[8, 8], num_prefix_tokens=0,
                                       interpolation="bicubic", antialias=aa) for aa in (False, True)}
    assert float((want[True] - want[False]).abs().max()) > 0.1
    torch.testing.assert_close(vit.pos_embed.detach(), want[False])
    torch.testing.assert_close(vit.blocks[0].attn.qkv.weight, native.blocks[0].attn.qkv.weight)


def test_length_buckets_give_the_padded_batch_loss_and_gradients():
    "`train.text_buckets`: the same samples in length groups give the loss and gradients of one padded batch."
    from lexvla.losses import create_loss
    from lexvla.model import create_model
    from lexvla.text import TINY_WORDS
    from lexvla.trainstep import regularised
    words = [w for w in TINY_WORDS if w.isalpha()]
    g = torch.Generator().manual_seed(0)
    caps = [" ".join(words[int(i)] for i in torch.randint(len(words), (int(n),), generator=g))
            for n in torch.randint(1, 25, (8,), generator=g)]
    px = torch.randn(8, 3, 32, 32, generator=g)
    loss_fn = create_loss("overuse", lambda_img=0.5, lambda_txt=0.5, warmup_steps=0)
    res = {}
    for buckets in (1, 3):
        m = create_model("tiny", seed=0)
        tok = m.tokenize(caps)["attention_mask"]
        assert tok.shape[1] > int(tok.sum(1).min())  # the batch carries padding
        for via in ("captions", "prefix"):
            m.zero_grad(set_to_none=True)
            kw = {"captions": caps} if via == "captions" else {"text_prefix": m.text_prefix(m.tokenize(caps))}
            out = m(px, text_buckets=buckets, **kw)
            parts = loss_fn(out["image_features"], out["text_features"], out["logit_scale"], 0,
                            **regularised(out, "max"))
            parts["loss"].backward()
            res[buckets, via] = (float(parts["loss"].detach()), {k: p.grad.clone() for k, p in m.named_parameters()
                                                        if p.grad is not None})
    for via in ("captions", "prefix"):
        (l1, g1), (l3, g3) = res[1, via], res[3, via]
        assert l3 == pytest.approx(l1, rel=1e-6) and set(g1) == set(g3)
        for k in g1: torch.testing.assert_close(g3[k], g1[k], rtol=1e-4, atol=1e-6)


def test_prepare_keeps_clean_jpegs_byte_for_byte(tmp_path):
    "CC-12M: a JPEG that decodes cleanly at its stored size is copied, not re-encoded; others are converted."
    import io

    from PIL import Image

    from lexvla.prepare import Job, _clean
    cfg = {"store_size": 256, "quality": 95, "min_side": 8, "max_pixels": 10**8, "max_caption_chars": 1000,
           "mask_id_offset": 0}

    def encoded(size, fmt, mode="RGB"):
        b = io.BytesIO()
        Image.effect_noise(size, 40).convert(mode).save(b, fmt)
        return b.getvalue()

    for size, fmt, mode, kept in (((200, 180), "JPEG", "RGB", True), ((400, 300), "JPEG", "RGB", False),
                                  ((200, 180), "PNG", "RGB", False), ((200, 180), "JPEG", "L", False)):
        data = encoded(size, fmt, mode)
        (tmp_path / "img").write_bytes(data)
        c = _clean(Job("k", str(tmp_path / "img"), ["a caption"], None, cfg))
        assert (c.data == data) == kept and c.ext == ".jpg" and c.captions == ["a caption"], (size, fmt, mode)
        with Image.open(io.BytesIO(c.data)) as im: assert min(im.size) <= 256 and im.mode == "RGB"


def test_train_refuses_fsdp(tmp_path, monkeypatch):
    "FSDP would checkpoint a shard as the whole model: refused with the reason (README: DDP only)."
    import lexvla.train as T
    import lexvla.trainstep as S
    from accelerate.utils import DistributedType
    from test_pipeline import tiny_params

    from lexvla.params import ParamsError, params_from_dict

    class FSDPAccelerator(S.Accelerator):
        distributed_type = DistributedType.FSDP

    monkeypatch.setattr(S, "Accelerator", FSDPAccelerator)  # make_accelerator's
    (tmp_path / "data" / "train").mkdir(parents=True)
    (tmp_path / "data" / "train" / "00000.tar").write_bytes(b"")
    with pytest.raises(ParamsError, match="FSDP is not supported"):
        T.train(params_from_dict(tiny_params(variants=("lexvla",))), "lexvla", data_dir=tmp_path / "data",
                out_dir=tmp_path / "out", results_dir=tmp_path / "res", progress=False)
