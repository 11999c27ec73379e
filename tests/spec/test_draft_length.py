"""Draft length from the cost of a pass: the step-cost model and the expected-tokens-per-second cut."""

from __future__ import annotations

import pytest

from tasc_ray.spec.draft_length import StepCostModel, best_draft_length


def test_best_draft_length_trades_acceptance_for_cost():
    probs = [[0.9, 0.8, 0.7, 0.1, 0.05]] * 8
    assert best_draft_length(probs, lambda n: 1.0) == 5  # free verification: draft everything
    assert best_draft_length(probs, lambda n: float(n)) == 0  # cost proportional to tokens: no draft
    assert best_draft_length(probs, lambda n: 1.0 + n / 40) == 3
    assert best_draft_length([[]], lambda n: 1.0) == 0


def test_step_cost_model_fits_line_and_uses_prior():
    model = StepCostModel(prior_tokens=20)
    model.observe(8, 1.4)
    assert model(8) == pytest.approx(1.4) and model(28) == pytest.approx(2.4)  # slope from the prior
    model = StepCostModel(prior_tokens=20)
    for n in (8, 16, 32, 64) * 4:
        model.observe(n, 0.5 + 0.01 * n)
    assert model.a == pytest.approx(0.5, rel=0.05) and model.b == pytest.approx(0.01, rel=0.05)
