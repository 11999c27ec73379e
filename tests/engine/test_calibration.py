"""AcceptanceCalibration and the drafter's use of it: raw scores corrected by what verification accepted."""

from __future__ import annotations

from tasc_ray.engine.config import DrafterConfig, DraftMode
from tasc_ray.engine.cost import StepCostTable
from tasc_ray.engine.drafts.calibration import AcceptanceCalibration, calibration_key
from tasc_ray.engine.drafts.drafter import Drafter, _Candidate
from tasc_ray.engine.generator import SamplingParams, SpeculativeGenerator


def chain(n: int) -> list[int]:
    return list(range(-1, n - 1))


def test_calibration_moves_from_the_raw_factor_to_the_measured_share():
    cal = AcceptanceCalibration(bins=10, prior=8.0)
    key = calibration_key("context", 1, 0)
    assert cal(0.85) == 0.85 and cal(0.5, key) == 0.5  # no evidence: the raw scores
    for _ in range(200):
        cal.observe([0.85, 0.5], [key, key], chain(2), [])  # first scored 0.85, always rejected; the second unreached
    assert cal(0.85) < 0.05 and cal(0.5) == 0.5  # the unreached token's bin is untouched
    for _ in range(200):
        cal.observe([0.35, 0.55], [key, key], chain(2), [0, 1])  # both accepted
    assert cal(0.35) > 0.95 and cal(0.55) > 0.95
    assert cal.by_bin[8] == [200, 0]


def test_a_tree_counts_the_nodes_verification_reached():
    """Children of a rejected node were never reached: they teach nothing; siblings of the path were reached."""
    cal = AcceptanceCalibration()
    key = calibration_key("corpus", 2, 0)
    cal.observe([0.6, 0.6, 0.6, 0.6], [key] * 4, [-1, -1, 0, 1], [1, 3])  # root children 0, 1; 1 -> 3 accepted
    assert sum(trials for trials, _ in cal.by_bin) == 3 and cal.by_bin[6] == [3, 2]  # node 2 (under 0) unreached


def test_keys_separate_sources_and_back_off_to_the_score_bin():
    """A one-occurrence long corpus match (raw 1.0) that is always right, and a one-token context match (raw 1.0)
    that is always wrong: one raw score, two sources; each key learns its own share, and an unseen key starts from
    the bin's share over all keys."""
    cal = AcceptanceCalibration(prior=8.0)
    long_corpus, short_context = calibration_key("corpus", 20, 0), calibration_key("context", 1, 0)
    assert long_corpus != short_context and calibration_key("corpus", 21, 0) == long_corpus  # bucketed
    for _ in range(100):
        cal.observe([1.0], [long_corpus], [-1], [0])
        cal.observe([1.0], [short_context], [-1], [])
    assert cal(1.0, long_corpus) > 0.85 and cal(1.0, short_context) < 0.15
    unseen = calibration_key("live", 5, 3)
    assert abs(cal(1.0, unseen) - cal(1.0)) < 1e-9 and 0.4 < cal(1.0) < 0.6


class ConfidentlyWrongDrafter(Drafter):
    """Claims 0.97 for every draft token and is always wrong: calibration must learn to stop verifying drafts.
    With `learns` off it never updates its calibration, so it keeps trusting its raw scores."""

    def __init__(self, learns: bool) -> None:
        super().__init__(None, DrafterConfig(mode=DraftMode.CONTEXT))
        self.learns = learns

    def observe(self, trees, paths):
        if self.learns:
            super().observe(trees, paths)

    def _candidates(self, items, top_n=1):
        return [[_Candidate("context", 1, 3, 0.97)] for _ in items]  # token 3, claimed almost sure


class FixedCosts(StepCostTable):
    """A CPU-like cost table that the tiny model's own (nearly flat) timings do not overwrite."""

    def observe(self, rows, q, seconds):
        pass


def test_a_drafter_whose_drafts_fail_stops_drafting(tiny_model, tiny_tokenizer):
    costs = FixedCosts()
    for q in (1, 2, 4, 8):  # a CPU-like cost: a second query token costs 40% more
        costs.set(1, q, 1.0 + 0.4 * (q > 1) + 0.02 * q)
    results = {}
    for calibrate in (False, True):
        gen = SpeculativeGenerator(
            tiny_model, tiny_tokenizer, ConfidentlyWrongDrafter(calibrate), speculation_gate=False
        )
        gen.step_cost = costs
        gen.outputs.eos_ids = set()
        results[calibrate] = gen.generate([[5, 6, 7]], SamplingParams(max_new_tokens=80))[0]
    assert results[True].token_ids == results[False].token_ids  # lossless either way
    raw, calibrated = results[False].stats.drafted, results[True].stats.drafted
    assert raw > 300  # raw scores keep paying for rejected drafts, pass after pass
    assert calibrated < raw / 3  # calibrated: a dozen passes to learn, then plain steps
