"""Issue 21: LexVLA served as a sentence-transformers SparseEncoder: encode_query / encode_document give this
repository's thresholded vectors (to float rounding: sentence-transformers sorts a batch by length, so the padding
differs), and SparseEncoder.save / SparseEncoder(folder) round-trip the model."""
import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("sentence_transformers")
from sentence_transformers import SparseEncoder  # noqa: E402

from lexvla.transforms import image_transform  # noqa: E402
from lexvla.model import create_model  # noqa: E402
from lexvla.sparse import SparseVectors, threshold_for  # noqa: E402
from lexvla.sparse_encoder import sparse_encoder  # noqa: E402


def trained_tiny():
    "The tiny model with its trainable weights moved off their init (as training would), in eval mode."
    model = create_model("tiny").eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad: p.add_(0.02 * torch.randn_like(p))
    return model


def test_sparse_encoder_gives_the_repository_vectors(tmp_path):
    model = trained_tiny()
    enc = sparse_encoder(model)
    caps = ["a red ring", "two blue squares left of a star", "sky"]
    ims = [Image.fromarray(np.random.default_rng(i).integers(0, 255, (30, 30, 3), dtype=np.uint8)) for i in range(4)]
    thr = threshold_for(model.dim)
    with torch.no_grad():
        ref_q = SparseVectors.from_dense(model.encode_text(caps), thr).to_dense()
        px = torch.stack([image_transform(model.data_config, train=False)(x) for x in ims])
        ref_d = SparseVectors.from_dense(model.encode_image(px), thr).to_dense()
    def same(got, ref):
        got = got.to_dense().numpy()
        np.testing.assert_array_equal(got != 0, ref != 0)  # the same active words
        np.testing.assert_allclose(got, ref, rtol=0, atol=1e-6)
    same(enc.encode_query(caps, batch_size=2), ref_q)
    same(enc.encode_document(ims, batch_size=3), ref_d)
    np.testing.assert_array_equal(enc.encode_query(caps, batch_size=8).to_dense().numpy(), ref_q)  # one batch: bits
    enc.save(str(tmp_path / "st"))
    back = SparseEncoder(str(tmp_path / "st"), device="cpu", trust_remote_code=True)  # the module is lexvla's
    same(back.encode_query(caps), ref_q)
    same(back.encode_document(ims), ref_d)
    with pytest.raises(ValueError, match="query 2 of 2 is empty"): enc.encode_query(["red", ""])


def test_decode_names_the_words_that_lexvla_explains():
    """Issue 34: `SparseEncoder.decode` (how sentence-transformers users read a vector) names dimension i by the
    model's vocabulary word i, as `LexVLA.top_words` does, not by the LM tokenizer's piece i."""
    model = trained_tiny()
    enc = sparse_encoder(model)
    caps = ["a pink flamingo", "two blue squares left of a star", "sky"]
    q = enc.encode_query(caps)
    ims = [Image.fromarray(np.random.default_rng(i).integers(0, 255, (30, 30, 3), dtype=np.uint8)) for i in range(2)]
    d = enc.encode_document(ims)
    for vectors in (q, d):
        decoded, dense = enc.decode(vectors, top_k=8), vectors.to_dense()
        for got, v in zip(decoded, dense):
            want = model.top_words(v, 8)  # the tiny vocabulary spells each word once: no pieces to merge
            assert [w for w, _ in got] == [w for w, _ in want], (got, want)
            np.testing.assert_allclose([x for _, x in got], [x for _, x in want], rtol=1e-6)
    one = enc.decode(q[0], top_k=3)  # one vector: one list
    assert [w for w, _ in one] == [w for w, _ in model.top_words(q.to_dense()[0], 3)]
    ids = q.coalesce().indices()[1, :3].tolist()
    assert enc.tokenizer.convert_ids_to_tokens(ids) == [model.vocab.words[i] for i in ids]
    assert enc.tokenizer.convert_ids_to_tokens(ids) != model.tokenizer.convert_ids_to_tokens(ids)
