"""logprobs, logit_bias and presence/frequency penalties: the same with and without speculation, and equal to a
plain step-by-step reference."""

from __future__ import annotations

import torch

from tasc_ray.spec.config import DrafterConfig, DraftMode
from tasc_ray.spec.drafter import Drafter
from tasc_ray.spec.generator import SamplingParams, SpeculativeGenerator
from tasc_ray.spec.sampling import adjust_logits


class RepeatDrafter(Drafter):
    """Drafts the row's last three tokens again: often wrong, never empty."""

    def propose(self, rows, limits=None, step_cost=None, ragged=False):
        return [[] if row is None else row.tokens[-3:][: max(0, lim)] for row, lim in zip(rows, limits)]


class OracleDrafter(Drafter):
    """Drafts the known true continuation of each prompt: every draft token should be accepted, so positions
    after the first verify under penalties that count the draft tokens before them."""

    def __init__(self, truths: dict[tuple[int, ...], list[int]]) -> None:
        super().__init__(None, DrafterConfig(mode=DraftMode.CONTEXT))
        self.truths = truths

    def propose(self, rows, limits=None, step_cost=None, ragged=False):
        drafts = []
        for row, lim in zip(rows, limits):
            truth = next(t for p, t in self.truths.items() if tuple(row.tokens[: len(p)]) == p)
            done = len(row.tokens) - len(next(p for p in self.truths if tuple(row.tokens[: len(p)]) == p))
            drafts.append(truth[done : done + max(0, min(lim, 4))])
        return drafts


def generator(model, tokenizer) -> SpeculativeGenerator:
    return SpeculativeGenerator(model, tokenizer, RepeatDrafter(None, DrafterConfig(mode=DraftMode.CONTEXT)))


def reference(model, prompt: list[int], params: SamplingParams) -> list[int]:
    """Greedy decoding one full forward per token, the bias and penalties applied to the last position."""
    out: list[int] = []
    for _ in range(params.max_new_tokens):
        with torch.no_grad():
            logits = model(torch.tensor([prompt + out])).logits[0, -1:].float()
        adjust_logits(logits, params, out, [])
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
        oracle = SpeculativeGenerator(tiny_model, tiny_tokenizer, OracleDrafter(dict(zip(map(tuple, prompts), truths))))
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
