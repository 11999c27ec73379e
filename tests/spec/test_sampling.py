"""The verification rule: accepted draft lengths, and the target's tokens (argmax or warped samples)."""

from __future__ import annotations

import torch

from tasc_ray.spec.sampling import (
    SamplingParams,
    accepted_lengths,
    logits_warpers,
    row_sampler,
    row_seed,
    target_tokens,
)


def test_accepted_lengths_is_the_longest_agreeing_prefix():
    drafts = torch.tensor([[5, 6, 7], [5, 9, 7], [1, 1, 1], [5, 6, 0]])
    target = torch.tensor([[5, 6, 7, 8], [5, 6, 7, 8], [2, 1, 1, 1], [5, 6, 0, 3]])
    valid = torch.tensor([[True] * 3, [True] * 3, [True] * 3, [True, True, False]])  # last row drafted 2 (+pad)
    assert accepted_lengths(drafts, target, valid).tolist() == [3, 1, 0, 2]


def test_greedy_takes_the_argmax_and_sampling_follows_the_warped_distribution():
    logits = torch.tensor([[[0.0, 3.0, 1.0], [2.0, 0.0, 0.0]]])
    assert logits_warpers(SamplingParams()) is None and row_sampler(SamplingParams()) is None
    assert target_tokens(logits, [None], [0]).tolist() == [[1, 0]]
    top1 = [row_sampler(SamplingParams(temperature=1.0, top_k=1), row) for row in range(64)]
    samples = target_tokens(logits.expand(64, -1, -1).clone(), top1, [0] * 64)
    assert (samples[:, 0] == 1).all() and (samples[:, 1] == 0).all()  # top-k 1 leaves only the argmax
    free = [row_sampler(SamplingParams(temperature=1.0, seed=7), row) for row in range(4000)]
    drawn = target_tokens(logits.expand(4000, -1, -1).clone(), free, [0] * 4000)
    share = (drawn[:, 0] == 1).float().mean().item()
    assert abs(share - torch.softmax(logits[0, 0], -1)[1].item()) < 0.03


def test_a_rows_draw_depends_only_on_its_seed_and_output_position():
    """The token at output position t is the same whether it is drawn at query 0 of one pass or at query 2 of
    another, next to any other rows: what makes seeded sampling independent of drafts and batches."""
    logits = torch.randn(1, 6, 50)
    params = SamplingParams(temperature=1.0, seed=3)
    sampler = row_sampler(params)
    alone = target_tokens(logits.clone(), [sampler], [10])[0]
    shifted = target_tokens(logits[:, 2:].clone(), [sampler], [12])[0]
    assert shifted.tolist() == alone[2:].tolist()
    batched = target_tokens(torch.cat([torch.randn(1, 6, 50), logits]), [None, sampler], [0, 10])[1]
    assert batched.tolist() == alone.tolist()
    assert row_seed(3, 0) == row_seed(3, 0) != row_seed(3, 1)
