"""Label propagation (the baseline and SST's prior) against a dense reference, and the model pieces around it."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange

from models import SST
from models.label_propagation import (
    FeaturePropagator, cell_values, labels_to_values, normalize_features, propagate_labels,
)


def dense_reference(query, keys, values, radius, topk, temperature):
    """Every query against every key in float64, out-of-radius keys dropped, then top-k softmax."""
    B, C, h, w = query.shape
    T = keys.shape[1]
    q = rearrange(query.double(), "b c y x -> b (y x) c")
    k = rearrange(keys.double(), "b t c y x -> b (t y x) c")
    v = rearrange(values.double(), "b t o y x -> b (t y x) o")
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    qy, qx = ys.flatten(), xs.flatten()
    ky, kx = qy.repeat(T), qx.repeat(T)
    near = ((qy[:, None] - ky[None]).abs() <= radius) & ((qx[:, None] - kx[None]).abs() <= radius)
    logits = (q @ k.transpose(1, 2) / temperature).masked_fill(~near, float("-inf"))
    top, index = logits.topk(topk, dim=-1)
    weights = top.softmax(-1)
    picked = torch.stack([v[b][index[b]] for b in range(B)])  # (B, n, topk, O)
    out = (weights[..., None] * picked).sum(2)
    return rearrange(out, "b (y x) o -> b o y x", y=h).float()


@pytest.mark.parametrize("radius, tile", [(1, 8), (2, 3), (4, 5)])
def test_propagation_matches_the_dense_reference(radius, tile):
    B, T, C, h, w, O = 2, 3, 8, 9, 11, 3
    keys = normalize_features(torch.randn(B, T, C, h, w))
    query = normalize_features(torch.randn(B, C, h, w))
    values = labels_to_values(torch.randint(-1, O, (B, T, h, w)), O)
    got = propagate_labels(query, keys, values, radius=radius, topk=5, temperature=0.1, tile=tile)
    want = dense_reference(query, keys, values, radius, 5, 0.1)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_a_frame_propagates_to_itself():
    """Identical features: each cell's best match is itself, so one-hot labels come back exactly (low temperature)."""
    O = 4
    feats = normalize_features(torch.randn(1, 16, 12, 10))
    labels = torch.randint(0, O, (1, 1, 12, 10))
    out = propagate_labels(feats, feats[:, None], labels_to_values(labels, O), radius=3, topk=1)
    assert torch.equal(out.argmax(1), labels[:, 0])


def test_cell_values_are_shares_and_ignore_unknown():
    labels = torch.tensor([[[0, 1, 2, 2], [1, 1, -1, 2]]])  # (1, 2, 4): two 2x2 cells
    v = cell_values(labels, 2, 3)
    torch.testing.assert_close(v[0, :, 0, 0], torch.tensor([0.25, 0.75, 0.0]))
    torch.testing.assert_close(v[0, :, 0, 1], torch.tensor([0.0, 0.0, 1.0]))


def test_untrained_sst_with_a_prior_outputs_exactly_the_propagation():
    """The decoder's correction starts at zero: before training, the logits are log(prior), upsampled."""
    torch.manual_seed(0)
    model = SST(attn="strided", backbone="efficientnet_lite0", backbone_stride=8, label_prior=True, dim=16,
                depth=1, heads=2, decoder_dim=8, stride=(1, 2, 2)).eval()
    video = torch.rand(1, 3, 3, 64, 80)
    labels = torch.randint(0, 3, (1, 3, 64, 80))
    with torch.no_grad():
        logits = model(video, labels, num_objects=3)
        _, _, keys = model.extract(rearrange(video, "b t c h w -> (b t) c h w"))
        keys = keys[None]
        values = cell_values(labels[0, :2], 8, 3)[None]
        prior = propagate_labels(keys[:, -1], keys[:, :2], values)
    log_prior = prior.clamp_min(1e-3).log()
    expected = F.interpolate(F.interpolate(log_prior, size=(16, 20), mode="bilinear", align_corners=False),
                             size=(64, 80), mode="bilinear", align_corners=False)
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)


def test_encoder_affinities_of_the_newest_frame_equal_the_full_call():
    """Only the newest frame's affinities are computed (T_q = 1); they equal those of a call over every frame."""
    model = SST(attn="local_strided", dim=16, depth=1, heads=4, stride=(1, 2, 2), kernel_size=(3, 3, 3)).eval()
    layer = model.encoder.layers[0]
    x = torch.randn(1, 3, 6, 8, 16)  # (B, T, H, W, C)
    labels = torch.randint(-1, 3, (1, 3, 6, 8))
    with torch.no_grad():
        out, affinity = layer._attend(x, labels, 3)
        full_out, full_aff = layer.attn(rearrange(x, "b t h w c -> b c t h w"), labels, 3)
    torch.testing.assert_close(out, rearrange(full_out, "b c t h w -> b t h w c"), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(affinity, full_aff[:, :, :, -1], atol=1e-6, rtol=1e-5)


def test_feature_propagator_follows_a_moving_square():
    """A textured square sliding over a different texture: the training-free baseline tracks it."""
    torch.manual_seed(0)
    H, W, T = 96, 128, 5
    background = torch.rand(3, 1, 1) * 0.3 + 0.1 * torch.rand(3, H, W)
    patch = 0.6 + 0.4 * torch.rand(3, 32, 32)
    frames, masks = [], []
    for t in range(T):
        img, m = background.expand(3, H, W).clone(), torch.zeros(H, W, dtype=torch.long)
        y, x = 30, 20 + 6 * t
        img[:, y:y + 32, x:x + 32] = patch
        m[y:y + 32, x:x + 32] = 1
        frames.append(img)
        masks.append(m)
    ids = FeaturePropagator(context=2).segment_video(frames, {0: masks[0]})
    for t in range(1, T):
        inter = ((ids[t] == 1) & (masks[t] == 1)).sum()
        union = ((ids[t] == 1) | (masks[t] == 1)).sum()
        assert inter / union > 0.7, f"frame {t}: IoU {float(inter / union):.2f}"


def test_encoder_computing_only_what_the_decoder_reads_equals_the_full_computation():
    """The last layer computes only the newest frame (its output and affinities); every frame of
    every layer through SparseAttention3d's own forward gives the same encoding and affinities."""
    model = SST(attn="strided", dim=16, depth=2, heads=2, stride=(1, 2, 2)).eval()
    x = torch.randn(1, 16, 3, 6, 8)
    labels = torch.randint(-1, 3, (1, 3, 6, 8))
    labels[:, -1] = -1
    with torch.no_grad():
        encoding, affinity = model.encoder(x, labels, 3)
        ref, ref_aff = x, []
        for layer in model.encoder.layers:
            h = rearrange(layer.norm1(rearrange(ref, "b c t h w -> b t h w c")), "b t h w c -> b c t h w")
            y, aff = layer.attn(h, labels, 3)
            ref = rearrange(ref + y, "b c t h w -> b t h w c")
            ref = rearrange(ref + layer.ffn(layer.norm2(ref)), "b t h w c -> b c t h w")
            ref_aff.append(aff[:, :, :, -1])
        ref = rearrange(model.encoder.norm(rearrange(ref[:, :, -1], "b c h w -> b h w c")), "b h w c -> b c h w")
    torch.testing.assert_close(encoding, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(affinity, torch.cat(ref_aff, dim=1), atol=1e-6, rtol=1e-5)


def test_channel_argmax_matches_torch_argmax_ties_and_nan():
    from models.label_propagation import channel_argmax

    g = torch.Generator().manual_seed(0)
    for shape in [(1, 4, 4), (2, 5, 7), (3, 100), (4, 20, 30)]:
        x = torch.randint(0, 3, shape, generator=g).float()  # many ties
        x.view(-1)[::17] = float("nan")
        assert torch.equal(channel_argmax(x), x.argmax(dim=0))
        x = torch.rand(shape, generator=g)
        assert torch.equal(channel_argmax(x), x.argmax(dim=0))
