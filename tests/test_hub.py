"""Issue 21: save_pretrained / from_pretrained through a local folder laid out as a hub snapshot (no network here:
push_to_hub's upload is not tested), bit-identical vectors, the model card with its evaluation table."""
import shutil

import pytest
import torch
from huggingface_hub import ModelCard

from lexvla.hub import from_pretrained, model_card
from lexvla.model import LexVLA, create_model, load_trained


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
    import dataclasses
    model = create_model("tiny")
    model.config = dataclasses.replace(cfg, lm=dataclasses.replace(cfg.lm, source="hf", path="meta-llama/Llama-2-7b-hf",
                                                                   pretrained=True))
    card = model_card(model)
    assert card.data.license == "llama2" and "Llama 2 Community License" in card.text
    assert "meta-llama/Llama-2-7b-hf" in card.data.base_model
