"""Draft length from the cost of a pass: the step-cost table and the expected-tokens-per-second cut."""

from __future__ import annotations

import pytest

from tasc_ray.engine.cost import SpeculationGate, StepCostTable, best_draft_length, ragged_draft_lengths


def test_best_draft_length_trades_acceptance_for_cost():
    probs = [[0.9, 0.8, 0.7, 0.1, 0.05]] * 8
    assert best_draft_length(probs, lambda rows, q: 1.0) == 5  # free verification: draft everything
    assert best_draft_length(probs, lambda rows, q: float(rows * q)) == 0  # cost proportional to tokens: no draft
    assert best_draft_length(probs, lambda rows, q: 1.0 + rows * q / 40) == 3
    assert best_draft_length([[]], lambda rows, q: 1.0) == 0


def test_a_step_in_cost_from_one_to_two_tokens_stops_weak_drafts():
    """CPU-like costs: q=2 costs 1.6x q=1, then nearly flat. A weak draft is not worth the step; a strong one is."""
    table = StepCostTable()
    for q, ms in ((1, 40.0), (2, 64.0), (4, 66.0), (8, 70.0), (16, 80.0)):
        table.observe(1, q, ms / 1000)
    assert best_draft_length([[0.4, 0.1]], table) == 0  # at most 1.5 tokens for 1.6x-1.65x the cost
    assert best_draft_length([[0.9, 0.85, 0.8, 0.75, 0.7, 0.6, 0.5]], table) == 7


def test_step_cost_table_interpolates_and_extrapolates():
    table = StepCostTable(prior_tokens=20)
    assert table(1, 1) == pytest.approx(1.05) and table(8, 2) == pytest.approx(1.8)  # the prior, before anything
    table.observe(1, 1, 0.040)
    assert table(1, 1) == pytest.approx(0.040)
    assert table(1, 21) == pytest.approx(0.040 * 2.05 / 1.05)  # one measurement: the prior's shape scales it
    table.observe(1, 4, 0.060)
    assert table(1, 2) == pytest.approx(0.040 + 0.020 / 3)  # linear between measured q
    assert table(1, 8) == pytest.approx(0.060 * 1.4 / 1.2)  # beyond the last q: the prior's shape
    table.observe(8, 1, 0.080)
    table.observe(8, 4, 0.160)
    assert table(4, 4) == pytest.approx(0.060 + (0.160 - 0.060) * 3 / 7)  # linear in rows between measured rows
    table.observe(5, 2, 0.100)  # a row count seen online at one q only: other q come from the measured rows
    assert table(5, 4) == pytest.approx(0.060 + (0.160 - 0.060) * 4 / 7) and table(5, 2) == 0.100
    table.observe(1, 1, 0.050)  # online refinement: a moving average
    assert 0.040 < table(1, 1) < 0.050
    assert list(table.table()) == [1, 5, 8] and list(table.table()[1]) == [1, 4]


def test_profile_fills_the_table(tiny_model, tiny_tokenizer):
    from tasc_ray.engine.generator import SpeculativeGenerator

    generator = SpeculativeGenerator(tiny_model, tiny_tokenizer, None, max_batch_size=4, speculation_gate=False)
    table = generator.profile_step_costs(queries=(1, 2, 4), context=32, repeats=1)
    assert list(table) == [1, 4] and all(list(cells) == [1, 2, 4] for cells in table.values())
    assert all(s > 0 for cells in table.values() for s in cells.values())
    assert generator.step_cost(4, 2) == table[4][2]
    assert 0.0 <= generator.step_cost.padding_share <= 1.0  # the fast forward's ragged pass was timed too


def test_ragged_lengths_give_each_row_its_own_draft():
    strong, weak = [0.95, 0.9, 0.85, 0.8, 0.75], [0.1, 0.05]
    per_token = lambda rows, q: 1.0 + rows * q / 40  # noqa: E731  (cost follows total query tokens)
    lengths = ragged_draft_lengths([strong, weak, strong, []], per_token)
    assert lengths == [5, 0, 5, 0]
    assert ragged_draft_lengths([strong, weak], lambda rows, q: 1.0) == [5, 2]  # free verification: everything
    assert ragged_draft_lengths([strong, weak], lambda rows, q: rows * q) == [0, 0]  # per-token cost: nothing


def test_ragged_lengths_take_the_most_probable_slots_in_row_order():
    # A non-monotone estimate is read as its running minimum: a row's later slot never outranks an earlier one.
    lengths = ragged_draft_lengths([[0.5, 0.9], [0.6]], lambda rows, q: 1.0 + 0.27 * (q - 1) * rows)
    assert lengths == [0, 1]


def test_padding_share_prices_the_longest_row():
    """Attention pads every row to the longest draft: with a share of that padding priced in, one row's long
    draft is cut where the mean-only cost would let it run."""
    table = StepCostTable()
    for q, ms in ((1, 40.0), (2, 56.0), (4, 86.0), (8, 150.0)):
        table.set(8, q, ms / 1000)
    one_strong = [[0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6]] + [[]] * 7
    free_padding = ragged_draft_lengths(one_strong, table, padding_share=0.0)
    priced = ragged_draft_lengths(one_strong, table, padding_share=1.0)
    assert free_padding[0] == 7 and priced[0] < free_padding[0] and sum(priced[1:]) == 0


def test_ragged_passes_refine_the_padding_share():
    table = StepCostTable(smoothing=0.5, padding_share=0.5)
    table.set(8, 1, 0.040)
    table.set(8, 8, 0.120)
    low, high = table(8, 15 / 8), 0.120
    table.observe_ragged(8, 15 / 8, 8, low + 0.2 * (high - low), replace=True)
    assert table.padding_share == pytest.approx(0.2)
    table.observe_ragged(8, 15 / 8, 8, high)  # paid all of its padding: the share moves halfway to 1
    assert table.padding_share == pytest.approx(0.6)
    assert table.ragged(8, 15 / 8, 8) == pytest.approx(low + 0.6 * (high - low))
    table.observe_ragged(8, 8.0, 8, 1.0)  # not ragged: nothing to learn
    assert table.padding_share == pytest.approx(0.6)


def test_the_gate_switches_drafting_off_where_it_measurably_loses():
    gate = SpeculationGate(memory=0.9, min_passes=2, explore_every=4, clear_margin=0.3)
    assert gate.allow(8)  # nothing measured: draft
    for _ in range(2):
        gate.observe(8, True, 18, 0.100)  # 180 tokens/s with drafts
    assert gate.rate(8, True) == pytest.approx(180) and gate.rate(8, False) is None
    assert [gate.allow(9) for _ in range(4)] == [False, True, False, True]  # plain interleaved (8-15: one bucket)
    for _ in range(2):
        gate.observe(9, False, 9, 0.045)  # 200 tokens/s without: drafting loses by 11%
    assert sum(gate.allow(8) for _ in range(16)) == 4  # drafts retried every 4th pass
    for _ in range(40):
        gate.observe(8, False, 8, 0.020)  # 400 tokens/s plain: a clear lead, drafts retried every 16th pass
    assert sum(gate.allow(8) for _ in range(32)) == 2
    assert gate.allow(1) and gate.allow(4)  # other batch sizes have their own measurements


def test_the_engine_gate_keeps_drafting_where_it_pays(tiny_model, tiny_tokenizer):
    from tasc_ray.engine.config import DrafterConfig, DraftMode
    from tasc_ray.engine.drafts.drafter import Drafter
    from tasc_ray.engine.generator import SamplingParams, SpeculativeGenerator

    drafter = Drafter(None, DrafterConfig(mode=DraftMode.CONTEXT))
    generator = SpeculativeGenerator(tiny_model, tiny_tokenizer, drafter, max_batch_size=1, speculation_gate=True)
    generator.generate([[5, 6, 7, 5, 6, 7, 5, 6]], SamplingParams(max_new_tokens=24, ignore_eos=True))
    assert generator.proposer.gate.rate(1, True) is not None


def test_a_cost_cap_keeps_a_pass_within_its_budget():
    """A probe's budget: the lengths maximise the rate among passes costing at most max_cost, the most probable
    slots first; the uncapped choice would verify more."""
    table = StepCostTable()
    for q, ms in ((1, 40.0), (2, 64.0), (4, 112.0), (8, 208.0)):  # 24 ms a query token per 8 rows: compute-bound
        table.set(8, q, ms / 1000)
    strong = [[0.95, 0.9, 0.85, 0.8]] * 8
    uncapped = ragged_draft_lengths(strong, table)
    capped = ragged_draft_lengths(strong, table, max_cost=1.5 * table(8, 1))
    assert sum(uncapped) == 32 and sum(capped) == 6  # 3 ms a slot: 6 slots fit the 20 ms over a plain pass
    assert table(8, 1 + sum(capped) / 8) <= 1.5 * table(8, 1) + 1e-12
    assert best_draft_length(strong, table, max_cost=1.5 * table(8, 1)) == 0  # padded: K = 1 costs 1.6x already
    assert best_draft_length(strong, table) > 0


def test_the_gate_says_which_passes_are_probes():
    """Drafting passes before drafting is measured, and drafting retried where it loses, are probes; drafting
    where it measurably wins is not."""
    gate = SpeculationGate(memory=0.9, min_passes=2, explore_every=4, clear_margin=0.3)
    assert gate.allow(8) and gate.probing
    for _ in range(2):
        gate.observe(8, True, 18, 0.100)  # drafts 180 tokens/s
        gate.observe(8, False, 8, 0.020)  # plain 400 tokens/s: drafting loses
    retried = [gate.probing for _ in range(64) if gate.allow(8)]
    assert retried and all(retried)
    for _ in range(60):
        gate.observe(8, True, 40, 0.050)  # drafts now 800 tokens/s: drafting wins
    assert gate.allow(8) and not gate.probing
