"""VisionZip against an independent implementation of the reference code, and on inputs with known answers."""

from __future__ import annotations

import pytest
import torch

from comfy_visionzip import VisionZipError
from comfy_visionzip.zip import compress, pool, split_tokens, uniform, visionzip


def reference_visionzip(hidden, attn_cls_row, metric, dominant_num, contextual_num):
    """Transcription of the VisionZip reference (CLIP, with CLS): dominant_num excludes the CLS token."""
    B, S, D = hidden.shape
    topk_indices = attn_cls_row.topk(dominant_num, dim=1).indices + 1
    all_indices = torch.cat([torch.zeros((B, 1), dtype=topk_indices.dtype), topk_indices], dim=1)
    mask = torch.ones_like(hidden[:, :, 0], dtype=torch.bool).scatter_(1, all_indices, False)
    dominant_tokens = hidden.masked_select(~mask.unsqueeze(-1)).view(B, dominant_num + 1, D)
    metric_filtered = metric[mask].view(B, S - (dominant_num + 1), metric.shape[2])
    hidden_filtered = hidden.masked_select(mask.unsqueeze(-1)).view(B, S - (dominant_num + 1), D)
    metric_normalized = metric_filtered / metric_filtered.norm(dim=-1, keepdim=True)
    step = max(1, metric_normalized.shape[1] // contextual_num)
    target_indices = torch.arange(0, metric_normalized.shape[1], step)[:contextual_num]
    target_tokens = metric_normalized[:, target_indices, :]
    keep = ~torch.isin(torch.arange(metric_normalized.shape[1]), target_indices)
    tokens_to_merge = metric_normalized[:, keep, :]
    similarity = torch.bmm(tokens_to_merge, target_tokens.transpose(1, 2))
    assign_one_hot = torch.zeros(B, tokens_to_merge.shape[1], contextual_num, dtype=hidden.dtype)
    assign_one_hot.scatter_(2, similarity.argmax(dim=2).unsqueeze(-1), 1)
    counts = assign_one_hot.sum(dim=1).clamp(min=1).unsqueeze(-1)
    aggregated = torch.bmm(assign_one_hot.transpose(1, 2), hidden_filtered[:, keep, :]) / counts
    contextual_tokens = hidden_filtered[:, target_indices, :] + aggregated
    return torch.cat([dominant_tokens, contextual_tokens], dim=1), all_indices.sort(dim=1).values


def reference_no_cls(hidden, received, metric, dominant_num, contextual_num):
    """The same semantics for SigLIP (no CLS): the top ``dominant_num`` tokens by attention received."""
    B, S, D = hidden.shape
    top = received.topk(dominant_num, dim=1).indices
    mask = torch.ones(B, S, dtype=torch.bool).scatter_(1, top, False)
    dominant_tokens = hidden.masked_select(~mask.unsqueeze(-1)).view(B, dominant_num, D)
    rest_h = hidden.masked_select(mask.unsqueeze(-1)).view(B, S - dominant_num, D)
    rest_k = metric[mask].view(B, S - dominant_num, -1)
    rest_k = rest_k / rest_k.norm(dim=-1, keepdim=True)
    step = max(1, rest_k.shape[1] // contextual_num)
    targets = torch.arange(0, rest_k.shape[1], step)[:contextual_num]
    keep = ~torch.isin(torch.arange(rest_k.shape[1]), targets)
    sim = torch.bmm(rest_k[:, keep], rest_k[:, targets].transpose(1, 2))
    one_hot = torch.zeros(B, int(keep.sum()), contextual_num).scatter_(2, sim.argmax(2).unsqueeze(-1), 1)
    agg = torch.bmm(one_hot.transpose(1, 2), rest_h[:, keep]) / one_hot.sum(1).clamp(min=1).unsqueeze(-1)
    return torch.cat([dominant_tokens, rest_h[:, targets] + agg], dim=1), top.sort(dim=1).values


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("dominant, contextual", [(54, 10), (108, 20), (162, 30), (1, 16), (5, 1), (200, 377)])
def test_matches_reference_with_cls(seed, dominant, contextual):
    g = torch.Generator().manual_seed(seed)
    B, S, D = 3, 577, 48
    hidden = torch.randn(B, S, D, generator=g)
    scores = torch.rand(B, S - 1, generator=g)
    keys = torch.randn(B, S, 16, generator=g)
    ours = visionzip(hidden, scores, keys, dominant, contextual)
    ref_tokens, ref_dominant = reference_visionzip(hidden, scores, keys, dominant - 1, contextual)
    assert ours.tokens.shape == (B, dominant + contextual, D)
    assert torch.equal(ours.dominant_positions, ref_dominant)
    torch.testing.assert_close(ours.tokens, ref_tokens, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("seed", range(3))
def test_matches_reference_without_cls(seed):
    g = torch.Generator().manual_seed(seed)
    B, S, D = 2, 729, 40
    hidden, received, keys = (torch.randn(B, S, D, generator=g), torch.rand(B, S, generator=g),
                              torch.randn(B, S, 8, generator=g))
    ours = visionzip(hidden, received, keys, 60, 12, cls_token=False)
    ref_tokens, ref_dominant = reference_no_cls(hidden, received, keys, 60, 12)
    assert torch.equal(ours.dominant_positions, ref_dominant)
    torch.testing.assert_close(ours.tokens, ref_tokens, rtol=1e-5, atol=1e-5)


def test_known_answer_dominant_and_clusters():
    # 1 CLS + 12 patches. The CLS row prefers patches 7 and 2 (positions 8 and 3).
    S, D = 13, 4
    hidden = torch.arange(S, dtype=torch.float32)[None, :, None].repeat(1, 1, D)  # token s carries value s
    scores = torch.zeros(1, S - 1)
    scores[0, 7], scores[0, 2] = 0.9, 0.5
    # keys cluster by construction: positions {1,2,4,5,6} point "east", {7,9,10,11,12} point "north"
    keys = torch.zeros(1, S, 2)
    keys[0, :, 0] = 1.0
    keys[0, [7, 9, 10, 11, 12], :] = torch.tensor([0.0, 1.0])
    result = visionzip(hidden, scores, keys, dominant=3, contextual=2)
    assert result.dominant_positions.tolist() == [[0, 3, 8]]  # CLS + top 2, original order
    # remaining (original order): 1,2,4,5,6,7,9,10,11,12 -> R=10, step=5, targets at 0 and 5: positions 1 and 7
    assert result.contextual_positions.tolist() == [[1, 7]]
    tokens = result.tokens[0, :, 0].tolist()
    assert tokens[:3] == [0.0, 3.0, 8.0]
    assert tokens[3] == pytest.approx(1 + (2 + 4 + 5 + 6) / 4)  # target 1 + mean of its east cluster
    assert tokens[4] == pytest.approx(7 + (9 + 10 + 11 + 12) / 4)  # target 7 + mean of the north cluster
    assert result.assignment.tolist() == [[0, 3, 3, 1, 3, 3, 3, 4, 2, 4, 4, 4, 4]]


def test_contextual_zero_is_dominant_only_and_ties_are_deterministic():
    hidden = torch.randn(2, 17, 8)
    scores = torch.ones(2, 16)  # all tied: the earliest patches win
    result = visionzip(hidden, scores, torch.randn(2, 17, 4), dominant=5, contextual=0)
    assert result.dominant_positions.tolist() == [[0, 1, 2, 3, 4]] * 2
    assert torch.equal(result.tokens, hidden[:, :5])
    assert result.contextual_positions.shape == (2, 0)


def test_everything_kept_is_a_no_op():
    hidden = torch.randn(1, 10, 6)
    result = visionzip(hidden, torch.rand(1, 9), torch.randn(1, 10, 3), dominant=10, contextual=0)
    assert torch.equal(result.tokens, hidden)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_tracks_fp32(dtype):
    g = torch.Generator().manual_seed(0)
    hidden, keys = torch.randn(2, 257, 32, generator=g), torch.randn(2, 257, 16, generator=g)
    # integer scores are exact in every dtype, so the ranking cannot change with precision
    scores = torch.stack([torch.randperm(256, generator=g) for _ in range(2)]).float()
    hidden, keys = hidden.to(dtype), keys.to(dtype)
    ref = visionzip(hidden.float(), scores, keys.float(), 14, 3)  # the same inputs, in fp32
    low = visionzip(hidden, scores.to(dtype), keys, 14, 3)
    assert low.tokens.dtype == dtype
    assert torch.equal(low.dominant_positions, ref.dominant_positions)
    torch.testing.assert_close(low.tokens, ref.tokens.to(dtype))  # merged in fp32, rounded once at the end


def test_batch_items_are_independent():
    g = torch.Generator().manual_seed(1)
    hidden, scores, keys = (torch.randn(4, 50, 8, generator=g), torch.rand(4, 49, generator=g),
                            torch.randn(4, 50, 4, generator=g))
    batched = visionzip(hidden, scores, keys, 6, 4)
    for b in range(4):
        single = visionzip(hidden[b:b + 1], scores[b:b + 1], keys[b:b + 1], 6, 4)
        assert torch.equal(single.tokens[0], batched.tokens[b])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(dominant=500, contextual=100),
         "asked for 500 dominant + 100 contextual = 600 tokens, but each image has only 577 tokens"),
        (dict(dominant=0, contextual=10), "dominant counts the CLS token"),
        (dict(dominant=-1, contextual=10), "dominant must be an integer >= 0"),
        (dict(dominant=5, contextual=2.5), "contextual must be an integer >= 0"),
    ],
)
def test_bad_counts(kwargs, message):
    with pytest.raises(VisionZipError) as err:
        visionzip(torch.randn(1, 577, 8), torch.rand(1, 576), torch.randn(1, 577, 4), **kwargs)
    assert message in str(err.value)


def test_shape_mismatch_names_shapes():
    with pytest.raises(VisionZipError, match=r"scores must be \(B, 576\)"):
        visionzip(torch.randn(1, 577, 8), torch.rand(1, 577), torch.randn(1, 577, 4), 10, 2)


def test_baselines():
    hidden = torch.randn(2, 1 + 24 * 24, 8)
    u = uniform(hidden, 64)
    assert u.tokens.shape == (2, 64, 8) and u.dominant_positions[0, 0] == 0 and u.dominant_positions[0, -1] == 576
    assert pool(hidden, 64).tokens.shape == (2, 1 + 63, 8)  # CLS + a 7x9 grid
    p = pool(hidden, 17)  # CLS + 4x4: each pooled token averages a 6x6 block
    assert p.tokens.shape == (2, 17, 8) and torch.equal(p.tokens[:, 0], hidden[:, 0])
    for cell in (1, 6, 16):
        members = (p.assignment[0] == cell).nonzero()[:, 0]
        assert len(members) == 36
        torch.testing.assert_close(p.tokens[0, cell], hidden[0, members].mean(0))
    f = compress(hidden, None, None, 10, 2, method="full")
    assert torch.equal(f.tokens, hidden)
    with pytest.raises(VisionZipError,
                       match="unknown compression method 'topk'; valid: visionzip, full, pool, uniform"):
        compress(hidden, None, None, 10, 2, method="topk")


def test_split_tokens_follows_the_paper():
    assert [split_tokens(n) for n in (64, 128, 192)] == [(54, 10), (108, 20), (162, 30)]
    assert split_tokens(32) == (27, 5)  # LLaVA-NeXT per crop (x5 = 135 + 25)
    assert split_tokens(1) == (1, 0)
