"""Per-row samplers: greedy has none, a sampled row follows the warped distribution, and its draw depends only on
its seed and the output position."""

from __future__ import annotations

import torch

from tasc_ray.engine.sampling import SamplingParams, logits_warpers, row_sampler, row_seed


def test_sampling_follows_the_warped_distribution():
    logits = torch.tensor([[0.0, 3.0, 1.0], [2.0, 0.0, 0.0]])
    assert logits_warpers(SamplingParams()) is None and row_sampler(SamplingParams()) is None
    top1 = [row_sampler(SamplingParams(temperature=1.0, top_k=1), row) for row in range(64)]
    samples = torch.stack([s.sample(logits.clone(), [0, 1]) for s in top1])
    assert (samples[:, 0] == 1).all() and (samples[:, 1] == 0).all()  # top-k 1 leaves only the argmax
    free = [row_sampler(SamplingParams(temperature=1.0, seed=7), row) for row in range(4000)]
    drawn = torch.stack([s.sample(logits[:1].clone(), [0]) for s in free])
    share = (drawn[:, 0] == 1).float().mean().item()
    assert abs(share - torch.softmax(logits[0], -1)[1].item()) < 0.03


def test_a_rows_draw_depends_only_on_its_seed_and_output_position():
    """The token at output position t is the same whether it is drawn at query 0 of one pass or at query 2 of
    another: what makes seeded sampling independent of drafts and batches."""
    logits = torch.randn(6, 50)
    sampler = row_sampler(SamplingParams(temperature=1.0, seed=3))
    alone = sampler.sample(logits.clone(), list(range(10, 16)))
    shifted = sampler.sample(logits[2:].clone(), list(range(12, 16)))
    assert shifted.tolist() == alone[2:].tolist()
    same_depth = sampler.sample(logits[[1, 1]].clone(), [11, 11])  # two tree nodes at one depth, same logits
    assert same_depth[0] == same_depth[1] == alone[1]
    assert row_seed(3, 0) == row_seed(3, 0) != row_seed(3, 1)
