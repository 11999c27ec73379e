"""logprobs, logit_bias and presence/frequency penalties: the same with and without speculation, and equal to a
plain step-by-step reference."""

from __future__ import annotations

import torch

from tasc_ray.engine.config import DrafterConfig, DraftMode
from tasc_ray.engine.cost import StepCostTable
from tasc_ray.engine.drafts.drafter import Drafter
from tasc_ray.engine.drafts.tree import DraftTree
from tasc_ray.engine.generator import SamplingParams, SpeculativeGenerator
from tasc_ray.engine.sampling import adjust_logits


class RepeatDrafter(Drafter):
    """Drafts the row's last three tokens again: often wrong, never empty."""

    def propose(self, rows, limits=None, branching=False):
        return [
            DraftTree.chain([] if row is None else row.tokens[-3:][: max(0, lim)]) for row, lim in zip(rows, limits)
        ]


class OracleDrafter(Drafter):
    """Drafts the known true continuation of each prompt: every draft token should be accepted, so positions
    after the first verify under penalties that count the draft tokens before them."""

    def __init__(self, truths: dict[tuple[int, ...], list[int]]) -> None:
        super().__init__(None, DrafterConfig(mode=DraftMode.CONTEXT))
        self.truths = truths

    def propose(self, rows, limits=None, branching=False):
        drafts = []
        for row, lim in zip(rows, limits):
            truth = next(t for p, t in self.truths.items() if tuple(row.tokens[: len(p)]) == p)
            done = len(row.tokens) - len(next(p for p in self.truths if tuple(row.tokens[: len(p)]) == p))
            drafts.append(DraftTree.chain(truth[done : done + max(0, min(lim, 4))]))
        return drafts


def generator(model, tokenizer) -> SpeculativeGenerator:
    return SpeculativeGenerator(
        model, tokenizer, RepeatDrafter(None, DrafterConfig(mode=DraftMode.CONTEXT)), speculation_gate=False
    )


def reference(model, prompt: list[int], params: SamplingParams) -> list[int]:
    """Greedy decoding one full forward per token, the bias and penalties applied to the last position."""
    out: list[int] = []
    for _ in range(params.max_new_tokens):
        with torch.no_grad():
            logits = model(torch.tensor([prompt + out])).logits[0, -1:].float()
        adjust_logits(logits, params, out, [[]])
        out.append(int(logits.argmax()))
        if out[-1] == 2:
            break
    return out


def test_penalties_and_bias_are_lossless_under_speculation(tiny_model, tiny_tokenizer):
    gen = generator(tiny_model, tiny_tokenizer)
    prompts = [[5, 6, 7, 5, 6, 7, 5], [9, 10, 11]]
    for params in (
        SamplingParams(max_new_tokens=20, frequency_penalty=0.8, presence_penalty=0.4),
        SamplingParams(max_new_tokens=20, logit_bias={7: 3.0, 2: -100.0}),
    ):
        spec = gen.generate(prompts, params)
        plain = gen.generate(prompts, SamplingParams(**{**params.__dict__, "speculative": False}))
        assert [r.token_ids for r in spec] == [r.token_ids for r in plain]
        truths = [reference(tiny_model, p, params) for p in prompts]
        assert [r.token_ids for r in spec] == truths
        assert sum(r.stats.drafted for r in spec) > 0
        oracle = SpeculativeGenerator(
            tiny_model, tiny_tokenizer, OracleDrafter(dict(zip(map(tuple, prompts), truths))), speculation_gate=False
        )
        right = oracle.generate(prompts, params)
        assert [r.token_ids for r in right] == truths
        assert all(r.stats.accepted == r.stats.drafted > 4 for r in right)  # multi-token drafts all accepted
    biased = gen.generate([[9, 10, 11]], SamplingParams(max_new_tokens=6, logit_bias={42: 100.0}))[0]
    assert biased.token_ids == [42] * 6


def test_logprobs_are_the_models_own(tiny_model, tiny_tokenizer):
    gen = generator(tiny_model, tiny_tokenizer)
    prompt = [5, 6, 7, 5, 6, 7, 5]
    params = SamplingParams(max_new_tokens=12, logprobs=3)
    spec = gen.generate([prompt], params)[0]
    plain = gen.generate([prompt], SamplingParams(**{**params.__dict__, "speculative": False}))[0]
    assert spec.logprobs is not None and len(spec.logprobs) == spec.new_tokens
    with torch.no_grad():
        logits = tiny_model(torch.tensor([prompt + spec.token_ids])).logits[0].float()
    expected = torch.log_softmax(logits[len(prompt) - 1 : -1], -1)
    for j, ((token, logprob, top), (p_token, p_logprob, _)) in enumerate(zip(spec.logprobs, plain.logprobs)):
        assert token == spec.token_ids[j] == p_token
        assert abs(logprob - expected[j, token].item()) < 1e-4 and abs(logprob - p_logprob) < 1e-4
        assert len(top) == 3 and top[0][0] == token  # greedy: the chosen token is the most probable
        assert [lp for _, lp in top] == sorted((lp for _, lp in top), reverse=True)
    assert gen.generate([prompt], SamplingParams(max_new_tokens=4))[0].logprobs is None


class FlatCosts(StepCostTable):
    """Every pass costs the same: full token trees are verified, as on a GPU."""

    def __call__(self, rows, q):
        return 1.0

    def observe(self, rows, q, seconds):
        pass


def test_trees_keep_sampling_penalties_and_logprobs_lossless(tiny_model, tiny_tokenizer):
    """Branching n-gram trees over a repetitive prompt, verified by the one acceptance rule: seeded sampling,
    penalties and log-probabilities give exactly what plain decoding gives."""
    drafter = Drafter(None, DrafterConfig(mode=DraftMode.CONTEXT, tree_nodes=12, min_path_prob=0.0))
    gen = SpeculativeGenerator(tiny_model, tiny_tokenizer, drafter, speculation_gate=False)
    gen.step_cost = FlatCosts()
    shapes = []
    propose = gen.proposer.propose

    def recording(rows):
        trees = propose(rows)
        shapes.extend(t.is_chain for t in trees)
        return trees

    gen.proposer.propose = recording
    starts = [[5, 6, 7, 5, 6, 8], [9, 10, 11]]
    plain_greedy = gen.generate(starts, SamplingParams(max_new_tokens=10, speculative=False))
    # each prompt holds its own greedy continuation once already, so the context drafts it (and branches)
    prompts = [q + r.token_ids + q for q, r in zip(starts, plain_greedy)]
    accepted = 0
    for params in (
        SamplingParams(max_new_tokens=16, logprobs=2),
        SamplingParams(max_new_tokens=16, temperature=1.3, top_k=8, seed=4),
        SamplingParams(max_new_tokens=16, frequency_penalty=0.7, presence_penalty=0.3, logprobs=2),
        SamplingParams(max_new_tokens=16, temperature=0.9, seed=1, presence_penalty=0.5, logprobs=1),
    ):
        spec = gen.generate(prompts, params)
        plain = gen.generate(prompts, SamplingParams(**{**params.__dict__, "speculative": False}))
        assert [r.token_ids for r in spec] == [r.token_ids for r in plain]
        if params.logprobs:
            for a, b in zip(spec, plain):
                assert [t for t, _, _ in a.logprobs] == [t for t, _, _ in b.logprobs]
                assert all(abs(x[1] - y[1]) < 1e-4 for x, y in zip(a.logprobs, b.logprobs))
        accepted += sum(r.stats.accepted for r in spec)
    assert accepted > 0 and False in shapes  # real trees (not only chains) were verified
