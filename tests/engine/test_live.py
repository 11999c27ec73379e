"""Live learning: the overlay counts finished outputs, evicts the oldest past capacity, answers like the index,
and makes a drafter with no corpus index draft the task's outputs after it has seen some."""

from __future__ import annotations

import pytest

from tasc_ray.engine.config import DrafterConfig, DraftMode
from tasc_ray.engine.drafts.drafter import Drafter, build_drafter
from tasc_ray.engine.drafts.index import NgramIndex
from tasc_ray.engine.drafts.live import LiveNgrams
from tasc_ray.engine.simulate import simulate_acceptance


def test_counts_match_the_index_built_from_the_same_outputs():
    outputs = [[5, 6, 7, 8], [5, 6, 9], [6, 7, 8, 10]]
    live = LiveNgrams(max_order=3, capacity=10)
    for output in outputs:
        live.add(output)
    index = NgramIndex.build(outputs, max_order=3)
    for history in ([5, 6], [6], [6, 7], [1, 6, 7], [9]):
        ours, theirs = live.longest_matches([history])[0], index.longest_matches([history])[0]
        if theirs is None:
            assert ours is None
            continue
        assert ours.order == theirs.order
        assert dict(zip(ours.next_tokens.tolist(), ours.probs.tolist())) == pytest.approx(
            dict(zip(theirs.next_tokens.tolist(), theirs.probs.tolist()))
        )


def test_oldest_outputs_are_evicted():
    live = LiveNgrams(max_order=3, capacity=2)
    live.add([1, 2, 3])
    live.add([4, 5, 6])
    live.add([7, 8, 9])
    assert len(live) == 2 and live.outputs() == [[4, 5, 6], [7, 8, 9]]
    assert live.longest_matches([[1, 2]])[0] is None and live.longest_matches([[2]])[0] is None
    assert live.longest_matches([[7, 8]])[0].next_tokens.tolist() == [9]
    assert all(nexts for nexts in live.table.values())  # no empty entries left behind


def test_learned_state_survives_a_drafter_swap():
    """A reconfigured drafter (a new index, new settings) keeps the overlay's newest outputs, up to its own
    capacity, and the calibration; one without an overlay drops it."""
    drafter = Drafter(None, DrafterConfig(mode=DraftMode.MIXED, live_outputs=10))
    for output in ([1, 2, 3], [4, 5, 6], [7, 8, 9]):
        drafter.learn(output)
    drafter.calibration.by_bin[3] = [5, 2]
    index = NgramIndex.build([[1, 2, 4]], max_order=3)
    swapped = drafter.reconfigured(index, DrafterConfig(mode=DraftMode.MIXED, live_outputs=2, max_draft=3))
    assert swapped.index is index and swapped.config.max_draft == 3
    assert swapped.live.outputs() == [[4, 5, 6], [7, 8, 9]] and swapped.live.capacity == 2
    assert swapped.calibration is drafter.calibration
    assert drafter.reconfigured(index, DrafterConfig(mode=DraftMode.CONTEXT)).live is None


def test_a_drafter_without_index_learns_the_task(task_rows, tiny_tokenizer):
    outputs = [tiny_tokenizer(r["output"], add_special_tokens=False)["input_ids"] for r in task_rows[:160]]
    config = DrafterConfig(mode=DraftMode.MIXED, live_outputs=200)
    assert isinstance(build_drafter(None, config), Drafter)
    with pytest.raises(ValueError, match="needs an n-gram index or live_outputs"):
        Drafter(None, DrafterConfig(mode=DraftMode.MIXED, live_outputs=0))
    cold = simulate_acceptance(None, outputs, DrafterConfig(mode=DraftMode.CONTEXT), batch_size=8, score_from=120)
    warm = simulate_acceptance(None, outputs, config, batch_size=8, score_from=120)
    offline = simulate_acceptance(
        NgramIndex.build(outputs[:120], max_order=4), outputs, DrafterConfig(), batch_size=8, score_from=120
    )
    assert warm["sequences"] == cold["sequences"] == 40
    assert warm["tokens_per_pass"] > 1.2 * cold["tokens_per_pass"]
    assert warm["tokens_per_pass"] > 0.85 * offline["tokens_per_pass"]


def test_the_engine_learns_finished_outputs(tiny_model, tiny_tokenizer):
    from tasc_ray.engine.generator import SamplingParams, SpeculativeGenerator

    drafter = Drafter(None, DrafterConfig(mode=DraftMode.MIXED, live_outputs=10))
    generator = SpeculativeGenerator(tiny_model, tiny_tokenizer, drafter, max_batch_size=2, speculation_gate=False)
    results = generator.generate([[5, 6, 7], [8, 9, 10], [11, 12]], SamplingParams(max_new_tokens=6))
    assert sorted(drafter.live.outputs()) == sorted(r.token_ids for r in results if len(r.token_ids) >= 2)
