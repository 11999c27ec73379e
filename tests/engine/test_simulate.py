"""The offline acceptance simulator: teacher-forced replay through the Drafter, with known answers."""

from __future__ import annotations

import pytest

from tasc_ray.engine.config import DrafterConfig, DraftMode
from tasc_ray.engine.drafts.index import NgramIndex
from tasc_ray.engine.simulate import simulate_acceptance


def test_simulate_known_answers():
    seq = list(range(10, 30))  # 20 distinct tokens
    index = NgramIndex.build([seq] * 3, max_order=4, top_k=4)
    corpus = DrafterConfig(mode=DraftMode.CORPUS, max_draft=4, min_path_prob=0.1)
    # Pass 1 has no history (nothing to draft) and yields 1 token; then every pass drafts 4 correct tokens and
    # yields 5: 1 + ceil(19 / 5) = 5 passes.
    r = simulate_acceptance(index, [seq], corpus)
    assert (r["tokens"], r["passes"], r["accepted"], r["drafted"]) == (20, 5, 16, 16)
    assert r["tokens_per_pass"] == pytest.approx(4.0) and r["acceptance_rate"] == 1.0
    assert r["mean_accepted_per_pass"] == pytest.approx(16 / 5)
    assert r["accepted_hist"] == [1, 0, 0, 0, 4]  # the last pass drafts the 4 tokens left, and ends the output
    # Tokens the corpus never saw: nothing is drafted, one token per pass.
    unseen = list(range(100, 120))
    r = simulate_acceptance(index, [unseen], corpus)
    assert (r["passes"], r["drafted"], r["tokens_per_pass"]) == (20, 0, 1.0)
    # A wrong corpus: drafts are rejected, every pass yields one token, acceptance is 0.
    wrong = NgramIndex.build([[t, t + 50] for t in seq], max_order=2, top_k=1)
    r = simulate_acceptance(wrong, [seq], DrafterConfig(mode=DraftMode.CORPUS, max_draft=2))
    assert r["passes"] == 20 and r["accepted"] == 0 and r["drafted"] > 0 and r["acceptance_rate"] == 0.0
    # Context mode learns from the prompt: the same answer as the corpus, and nothing without the prompt.
    context = DrafterConfig(mode=DraftMode.CONTEXT, max_draft=4)
    assert simulate_acceptance(None, [seq], context, prompts=[seq])["passes"] == 5
    assert simulate_acceptance(None, [seq], context)["passes"] == 20
    # Batching rows in lockstep gives the same totals as one row at a time.
    seqs = [seq, unseen, seq[:7], seq[5:]]
    together = simulate_acceptance(index, seqs, corpus, batch_size=64)
    alone = [simulate_acceptance(index, [s], corpus) for s in seqs]
    assert together["passes"] == sum(a["passes"] for a in alone)
    assert together["accepted"] == sum(a["accepted"] for a in alone)
