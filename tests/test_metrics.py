"""lexvla.metrics against brute-force references: retrieval ranks with ties, the sparsity sweep, PatchDis."""
import math

import numpy as np
import pytest
import torch

from lexvla.metrics import (patchdis, patchdis_from_labels, retrieval_metrics, sparse_similarity, sparsity_sweep,
                            upsample_nearest)
from lexvla.sparse import SparseVectors


def brute_ranks(sim, t2i):
    "Per query: sort all candidates by (score desc, positives after equal non-positives); first positive's 1-based rank."
    i2t, t2i_r = [], []
    for i in range(sim.shape[0]):
        caps = [j for j in range(sim.shape[1]) if t2i[j] == i]
        if caps:
            order = sorted(range(sim.shape[1]), key=lambda j: (-sim[i, j], t2i[j] == i))
            i2t.append(1 + min(order.index(j) for j in caps))
    for j in range(sim.shape[1]):
        order = sorted(range(sim.shape[0]), key=lambda i: (-sim[i, j], i == t2i[j]))
        t2i_r.append(1 + order.index(t2i[j]))
    return np.array(i2t), np.array(t2i_r)


def expected(sim, t2i, ks):
    out = {}
    for name, r in zip(("image_to_text", "text_to_image"), brute_ranks(sim, t2i)):
        out[f"{name}_mean_rank"] = r.mean()
        out[f"{name}_median_rank"] = np.floor(np.median(r - 1)) + 1
        for k in ks: out[f"{name}_R@{k}"] = (r <= k).mean()
    return out


@pytest.mark.parametrize("seed,levels", [(0, 2), (1, 3), (2, 5), (3, 1000), (4, 1)])
def test_recall_matches_brute_force_with_ties(seed, levels):
    rng = np.random.default_rng(seed)
    n_img = 15
    t2i = np.sort(rng.integers(0, n_img, size=50))        # some images without captions, some with many
    sim = rng.integers(0, levels, size=(n_img, 50)).astype(np.float32) / max(levels - 1, 1)
    ks = (1, 2, 5, 10)
    got, ref = retrieval_metrics(torch.as_tensor(sim), torch.as_tensor(t2i), ks), expected(sim, t2i, ks)
    assert set(got) == set(ref)
    for k in ref: assert math.isclose(got[k], ref[k]), (k, got[k], ref[k])


def test_recall_chunked_equals_whole():
    from lexvla.metrics import _ranks
    rng = np.random.default_rng(5)
    sim = rng.integers(0, 4, size=(33, 70)).astype(np.float32); t2i = rng.integers(0, 33, size=70)
    a, b = _ranks(sim, t2i), _ranks(sim, t2i, chunk_elems=70 * 4 + 3)
    np.testing.assert_array_equal(a[0], b[0]); np.testing.assert_array_equal(a[1], b[1])


def test_recall_matches_clip_benchmark_topk_without_ties():
    "CLIP_benchmark's rule (a hit when a positive is in torch.topk), re-stated, on continuous scores."
    rng = np.random.default_rng(9)
    n_img, per = 20, 5
    t2i = np.repeat(np.arange(n_img), per)
    sim = torch.as_tensor(rng.normal(size=(n_img, n_img * per)).astype(np.float32))
    pos = torch.zeros(n_img, n_img * per, dtype=torch.bool); pos[torch.as_tensor(t2i), torch.arange(len(t2i))] = True
    got = retrieval_metrics(sim, t2i)
    for k in (1, 5, 10):
        hit_i2t = pos.gather(1, torch.topk(sim, k, dim=1)[1]).any(1).float().mean().item()
        hit_t2i = pos.T.gather(1, torch.topk(sim.T, k, dim=1)[1]).any(1).float().mean().item()
        assert math.isclose(got[f"image_to_text_R@{k}"], hit_i2t, rel_tol=1e-6)
        assert math.isclose(got[f"text_to_image_R@{k}"], hit_t2i, rel_tol=1e-6)


def test_recall_errors():
    with pytest.raises(ValueError, match="does not match"): retrieval_metrics(np.zeros((2, 3)), [0, 1])
    with pytest.raises(ValueError, match="outside"): retrieval_metrics(np.zeros((2, 3)), [0, 1, 2])
    with pytest.raises(ValueError, match="NaN"): retrieval_metrics(np.full((2, 2), np.nan), [0, 1])


def test_sparse_similarity_and_sweep():
    rng = np.random.default_rng(2)
    V = 64
    img = rng.random((10, V)).astype(np.float32) ** 4; txt = rng.random((30, V)).astype(np.float32) ** 4
    t2i = np.repeat(np.arange(10), 3)
    rows = sparsity_sweep(img, txt, t2i, V, topks=(4, 16), threshold=True)
    assert [r["name"] for r in rows] == ["threshold", "top4", "top16"]
    for r in rows:
        si = SparseVectors.from_dense(img, threshold=r["threshold"], topk=r["topk"])
        st = SparseVectors.from_dense(txt, threshold=r["threshold"], topk=r["topk"])
        ref = retrieval_metrics(si.to_dense() @ st.to_dense().T, t2i)
        for k in ref: assert math.isclose(r[k], ref[k]), (r["name"], k)
        assert r["image_active_words"] == si.mean_active() and r["text_active_words"] == st.mean_active()
        assert math.isclose(r["text_quadratic_sparsity"], (1 - st.mean_active() / V) ** 2)
    assert rows[1]["image_active_words"] == 4
    s = sparse_similarity(SparseVectors.from_dense(img), SparseVectors.from_dense(txt), block=3)
    np.testing.assert_allclose(s, img @ txt.T, rtol=1e-5)


def test_upsample_nearest_matches_torch():
    lab = np.arange(35).reshape(5, 7)
    for size in [(10, 14), (11, 9), (5, 7), (64, 3)]:
        ref = torch.nn.functional.interpolate(torch.as_tensor(lab)[None, None].float(), size=size, mode="nearest")
        np.testing.assert_array_equal(upsample_nearest(lab, size), ref[0, 0].long().numpy())


def test_patchdis_hand_made():
    "Two 4x4 images on a 2x2 grid; the IoUs are counted by hand in the comments."
    cls = np.eye(3, dtype=np.float32)  # background, circle, square
    pv = np.zeros((2, 4, 3), np.float32)
    pv[0, :, 0] = 1; pv[0, 3] = [0, 0.2, 0.9]   # image 0: bottom-right patch says square (absent) > circle > bg
    pv[1, :, 1] = 1; pv[1, 2] = [0.3, 0, 0]     # image 1: circle everywhere but the bottom-left patch
    m = np.zeros((2, 4, 4), np.int64)
    m[0, 2:, 2:] = 1                           # image 0: circle in the bottom-right patch
    m[1, :2, :] = 1; m[1, 2:, :2] = 255        # image 1: circle on top, unlabelled bottom-left, bg bottom-right
    m[m == 255] = -1
    r = patchdis(torch.as_tensor(pv), torch.as_tensor(cls), list(m), grid=(2, 2), class_names=["bg", "circle", "square"])
    # image 0: present {bg, circle}; bottom-right -> circle (0.2 > 0): bg 12/12, circle 4/4
    # image 1: present {bg, circle}; bottom-left ignored; top circle 8/8; bottom-right predicted circle, truly bg
    #   -> circle I=8, U=12; bg I=0, U=4
    assert r["per_class_IoU"] == {"bg": 12 / 16, "circle": 12 / 16, "square": None}
    assert r["mIoU"] == 0.75 and r["classes_scored"] == 2
    # explicit present classes override the mask's: allow only background in image 0
    r2 = patchdis(pv, cls, m, present_classes=[[0], [0, 1]], grid=(2, 2))
    assert r2["per_class_IoU"]["1"] == 8 / 16     # circle: image 0 0/4 (missed), image 1 8/12


def test_patchdis_equals_label_reference():
    "patchdis = argmax over present classes, nearest upsampling, dataset-wide IoU: a plain loop."
    rng = np.random.default_rng(4)
    b, h, w, V, c = 6, 3, 4, 20, 5
    pv = rng.random((b, h * w, V)).astype(np.float32); cls = rng.random((c, V)).astype(np.float32)
    masks = rng.integers(-1, c, size=(b, 9, 8))
    got = patchdis(lambda s, e: pv[s:e], cls, masks, grid=(h, w), batch_size=4)
    inter, union = np.zeros(c), np.zeros(c)
    for i in range(b):
        present = set(masks[i][masks[i] >= 0].tolist())
        for y in range(9):
            for x in range(8):
                g = masks[i, y, x]
                if g < 0: continue
                p = (y * h) // 9 * w + (x * w) // 8
                pred = max(sorted(present), key=lambda k: float(pv[i, p] @ cls[k]))
                inter[g] += pred == g; union[g] += 1; union[pred] += pred != g
    ref = inter / union
    assert np.allclose([got["per_class_IoU"][str(k)] for k in range(c)], ref)
    assert math.isclose(got["mIoU"], ref.mean())


def test_patchdis_errors():
    with pytest.raises(ValueError, match="grid"): patchdis(np.zeros((1, 6, 3)), np.eye(3), np.zeros((1, 4, 4), int), grid=(2, 2))
    with pytest.raises(ValueError, match="class names"): patchdis(np.zeros((1, 4, 3)), np.eye(3), np.zeros((1, 4, 4), int), class_names=["a"])
    with pytest.raises(ValueError, match="outside"): patchdis_from_labels([np.zeros((2, 2), int)], [np.full((2, 2), 7)], 3)
    with pytest.raises(ValueError, match="differ in size"): patchdis_from_labels([np.zeros((2, 2), int)], [np.zeros((3, 2), int)], 3)


def test_patchdis_on_a_non_square_image_crops_the_mask_like_the_image():
    """A 4:3 image (as COCO's) goes through the evaluation resize + centre crop; PatchDis must see its mask through
    the same crop. Patch vectors that label each patch by the colour the *transformed image* shows there score
    (almost) perfectly against `mask_transform`'s mask, and clearly worse against the mask stretched uncropped."""
    from PIL import Image

    from lexvla.transforms import backbone_data_config, image_transform, mask_transform
    from lexvla.metrics import patchdis
    cfg = backbone_data_config("vit_small_patch14_dinov2", img_size=56)
    mask = np.zeros((120, 160), dtype=np.int64)       # 160 x 120 px: class 0 (green) in the middle,
    mask[:, :49], mask[:, 111:] = 1, 2                 # class 1 (red) on the left, class 2 (blue) on the right
    colours = np.array([[0, 255, 0], [255, 0, 0], [0, 0, 255]], dtype=np.uint8)
    x = image_transform(cfg)(Image.fromarray(colours[mask])).numpy()  # (3, 56, 56): 4 x 4 patches of 14 px
    shown = x.argmax(0)                                # the colour each output pixel shows: 1 red, 0 green, 2 blue
    shown = np.select([shown == 0, shown == 1, shown == 2], [1, 0, 2])
    share = np.stack([(shown == k).reshape(4, 14, 4, 14).mean(axis=(1, 3)).reshape(-1) for k in range(3)], -1)
    pv = share[None]                                   # (1, 16, 3): the patch's word is the colour it shows
    cls = np.eye(3)
    cropped = patchdis(pv, cls, [mask_transform(cfg)(mask)], grid=(4, 4))["mIoU"]
    stretched = patchdis(pv, cls, [mask], grid=(4, 4))["mIoU"]
    assert mask_transform(cfg)(mask).shape == (56, 56)
    assert cropped > 0.9 and stretched < cropped - 0.1, (cropped, stretched)
