"""The verification rule: accepted draft lengths, and the target's tokens (argmax or warped samples)."""

from __future__ import annotations

import torch

from tasc_ray.spec.sampling import SamplingParams, accepted_lengths, logits_warpers, target_tokens


def test_accepted_lengths_is_the_longest_agreeing_prefix():
    drafts = torch.tensor([[5, 6, 7], [5, 9, 7], [1, 1, 1], [5, 6, 0]])
    target = torch.tensor([[5, 6, 7, 8], [5, 6, 7, 8], [2, 1, 1, 1], [5, 6, 0, 3]])
    valid = torch.tensor([[True] * 3, [True] * 3, [True] * 3, [True, True, False]])  # last row drafted 2 (+pad)
    assert accepted_lengths(drafts, target, valid).tolist() == [3, 1, 0, 2]


def test_greedy_takes_the_argmax_and_sampling_follows_the_warped_distribution():
    logits = torch.tensor([[[0.0, 3.0, 1.0], [2.0, 0.0, 0.0]]])
    assert logits_warpers(SamplingParams()) is None
    assert target_tokens(logits, None, None).tolist() == [[1, 0]]
    warpers = logits_warpers(SamplingParams(temperature=1.0, top_k=1))
    assert warpers is not None
    samples = target_tokens(logits.expand(64, -1, -1), warpers, torch.Generator().manual_seed(0))
    assert (samples[:, 0] == 1).all() and (samples[:, 1] == 0).all()  # top-k 1 leaves only the argmax
    free = target_tokens(
        logits.expand(4000, -1, -1), logits_warpers(SamplingParams(temperature=1.0)), torch.Generator().manual_seed(0)
    )
    share = (free[:, 0] == 1).float().mean().item()
    assert abs(share - torch.softmax(logits[0, 0], -1)[1].item()) < 0.03
