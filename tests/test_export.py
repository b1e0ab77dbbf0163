"""Issue 21: `python -m lexvla.export onnx`: both encoders through onnxruntime equal the PyTorch model (max abs
difference <= 1e-4, the same top-10 words), also from the exported tokenizer and config alone (tiny model: the
embedded checkpoint is a DVC output that a test cannot assume)."""
import json

import numpy as np
import onnxruntime as ort
import torch
from transformers import AutoTokenizer

from lexvla.export import main
from lexvla.model import create_model, save_trained


def test_onnx_export_matches_pytorch(tmp_path, capsys):
    model = create_model("tiny").eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad: p.add_(0.02 * torch.randn_like(p))  # non-zero LoRA deltas: the merge matters
    save_trained(model, tmp_path / "model")
    assert main(["onnx", "--checkpoint", str(tmp_path / "model"), "--out", str(tmp_path / "onnx")]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["ok"] and r["opset"] == 17 and len(r["graphs"]) == 4
    assert all(g["max_abs_diff"] <= 1e-4 and g["same_top10_words"] for g in r["graphs"])
    # a user with only the exported folder: tokenizer + prompt from lexvla_onnx.json, then onnxruntime
    cfg = json.loads((tmp_path / "onnx" / "lexvla_onnx.json").read_text())
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "onnx" / "tokenizer"))
    tok.padding_side = cfg["padding_side"]
    caps = ["a red ring above a green square", "star"]
    t = tok([cfg["prompt"].replace("{caption}", c) for c in caps], return_tensors="np", padding=True)
    sess = ort.InferenceSession(str(tmp_path / "onnx" / "text_encoder.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"input_ids": t["input_ids"].astype(np.int64),
                          "attention_mask": t["attention_mask"].astype(np.int64)})[0]
    with torch.no_grad(): ref = model.encode_text(caps).numpy()
    assert np.abs(got - ref).max() <= 1e-4
    assert [set(np.argsort(-r)[:10]) for r in got] == [set(np.argsort(-r)[:10]) for r in ref]
    img = ort.InferenceSession(str(tmp_path / "onnx" / "image_encoder.onnx"), providers=["CPUExecutionProvider"])
    px = torch.rand(5, *cfg["image_input_size"])
    with torch.no_grad(): ref = model.encode_image(px).numpy()
    assert np.abs(img.run(None, {"pixels": px.numpy()})[0] - ref).max() <= 1e-4
    assert len(cfg["words"]) == model.dim


def test_export_errors_are_one_line(tmp_path, capsys):
    assert main(["onnx", "--checkpoint", str(tmp_path / "none"), "--out", str(tmp_path / "o")]) == 2
    assert "missing, not a trained model folder" in capsys.readouterr().err
