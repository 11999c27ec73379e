"""SpeculativeGenerator: greedy output identical to model.generate, exact sampling, stops and statistics."""

from __future__ import annotations

import random
from collections import Counter

import numpy as np
import pytest
import torch

from tasc_ray.engine.config import DrafterConfig, DraftMode
from tasc_ray.engine.cost import StepCostTable
from tasc_ray.engine.drafts.drafter import DraftContext, Drafter, DraftTree
from tasc_ray.engine.drafts.index import NgramIndex
from tasc_ray.engine.generator import PromptTooLongError, SamplingParams, SpeculativeGenerator


class OracleDrafter(Drafter):
    """Drafts from a known continuation: always right, always wrong, or right with probability p_right."""

    def __init__(self, truths: dict[tuple[int, ...], list[int]], p_right: float, vocab: int, seed: int = 0) -> None:
        super().__init__(None, DrafterConfig(mode=DraftMode.CONTEXT, max_draft=5))
        self.truths, self.p_right, self.vocab, self.rng = truths, p_right, vocab, random.Random(seed)

    def new_row(self, prompt_ids):
        state = DraftContext(2)
        state.prompt = tuple(prompt_ids)
        state.extend(prompt_ids)
        return state

    def propose(self, rows, limits=None, branching=False):
        drafts = []
        for row, limit in zip(rows, limits):
            truth = self.truths[row.prompt]
            done = len(row.tokens) - len(row.prompt)
            k = self.rng.randint(0, min(5, limit)) if limit > 0 else 0
            draft = []
            for j in range(k):
                right = truth[done + j] if done + j < len(truth) else 1
                wrong = (right + 1 + self.rng.randrange(self.vocab - 1)) % self.vocab
                draft.append(right if self.rng.random() < self.p_right else wrong)
            drafts.append(DraftTree.chain(draft))
        return drafts


def reference_greedy(model, ids: list[int], max_new_tokens: int) -> list[int]:
    out = model.generate(
        torch.tensor([ids]),
        attention_mask=torch.ones(1, len(ids), dtype=torch.long),
        max_new_tokens=max_new_tokens,
        do_sample=False,
    )
    return out[0, len(ids) :].tolist()


def random_prompts(rng: random.Random, vocab: int, n: int) -> list[list[int]]:
    return [[rng.randrange(3, vocab) for _ in range(rng.randint(1, 40))] for _ in range(n)]


@pytest.mark.parametrize("p_right", [1.0, 0.0, 0.6])
@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_greedy_identical_to_generate(tiny_model, tiny_tokenizer, p_right, batch_size):
    vocab = len(tiny_tokenizer)
    for seed in range(3):
        rng = random.Random(seed * 100 + batch_size)
        prompts = random_prompts(rng, vocab, batch_size)
        truths = {tuple(p): reference_greedy(tiny_model, p, 24) for p in prompts}
        generator = SpeculativeGenerator(
            tiny_model,
            tiny_tokenizer,
            OracleDrafter(truths, p_right, vocab, seed),
            max_batch_size=batch_size,
            speculation_gate=False,
        )
        results = generator.generate(prompts, SamplingParams(max_new_tokens=24))
        for prompt, result in zip(prompts, results):
            expected = truths[tuple(prompt)]
            assert result.token_ids == expected
            assert result.finish_reason == ("stop" if expected[-1] == 2 else "length")
            if p_right == 1.0 and len(expected) > 6:
                assert result.stats.forward_passes < len(expected)


@pytest.mark.parametrize("mode", list(DraftMode))
def test_greedy_identical_with_ngram_drafter(tiny_model, tiny_tokenizer, task_rows, mode):
    outputs = [tiny_tokenizer(r["output"], add_special_tokens=False)["input_ids"] for r in task_rows[:200]]
    index = NgramIndex.build(outputs, max_order=4, tokenizer=tiny_tokenizer)
    drafter = Drafter(index, DrafterConfig(mode=mode))
    generator = SpeculativeGenerator(tiny_model, tiny_tokenizer, drafter, max_batch_size=4, speculation_gate=False)
    prompts = [r["prompt"][-200:] for r in task_rows[200:210]]
    results = generator.generate(prompts, SamplingParams(max_new_tokens=20))
    for prompt, result in zip(prompts, results):
        ids = tiny_tokenizer(prompt)["input_ids"]
        assert result.token_ids == reference_greedy(tiny_model, ids, 20)
    assert sum(r.stats.drafted for r in results) > 0


def test_plain_decoding_same_path(tiny_model, tiny_tokenizer):
    prompts = random_prompts(random.Random(7), len(tiny_tokenizer), 5)
    generator = SpeculativeGenerator(
        tiny_model, tiny_tokenizer, Drafter(None, DrafterConfig(mode=DraftMode.CONTEXT)), speculation_gate=False
    )
    spec = generator.generate(prompts, SamplingParams(max_new_tokens=16))
    plain = generator.generate(prompts, SamplingParams(max_new_tokens=16, speculative=False))
    assert [r.token_ids for r in spec] == [r.token_ids for r in plain]
    assert all(r.stats.drafted == 0 and r.stats.forward_passes == r.new_tokens - 1 for r in plain)


def test_bfloat16_runs(tiny_model, tiny_tokenizer):
    model = type(tiny_model)(tiny_model.config).to(torch.bfloat16).eval()
    model.load_state_dict(tiny_model.state_dict())
    generator = SpeculativeGenerator(
        model, tiny_tokenizer, Drafter(None, DrafterConfig(mode=DraftMode.CONTEXT)), speculation_gate=False
    )
    result = generator.generate([[5, 6, 7, 5, 6]], SamplingParams(max_new_tokens=8))[0]
    assert 1 <= result.new_tokens <= 8


def _sample(generator, prompt, params_list):
    return [r for params in params_list for r in generator.generate([prompt], params)]


def test_sampling_matches_plain_distribution(tiny_model, tiny_tokenizer):
    """Two-token sequences sampled with always-right-ish drafts follow the same law as plain sampling."""
    vocab = len(tiny_tokenizer)
    prompt = [10, 11, 12, 13]
    truth = reference_greedy(tiny_model, prompt, 8)
    generator = SpeculativeGenerator(
        tiny_model, tiny_tokenizer, OracleDrafter({tuple(prompt): truth}, 0.7, vocab), speculation_gate=False
    )
    n = 1500
    common = dict(max_new_tokens=3, temperature=1.5, top_k=6)
    spec_results = _sample(generator, prompt, [SamplingParams(seed=i, **common) for i in range(n)])
    plain_results = _sample(
        generator, prompt, [SamplingParams(seed=i + n, speculative=False, **common) for i in range(n)]
    )
    spec = Counter(tuple(r.token_ids[:2]) for r in spec_results)
    plain = Counter(tuple(r.token_ids[:2]) for r in plain_results)
    # Exact law of the first two tokens from the model itself.
    with torch.no_grad():
        first = torch.softmax(_topk(tiny_model(torch.tensor([prompt])).logits[0, -1] / 1.5, 6), -1)
    expected = {}
    for a in torch.nonzero(first).flatten().tolist():
        logits = tiny_model(torch.tensor([prompt + [a]])).logits[0, -1].detach()
        second = torch.softmax(_topk(logits / 1.5, 6), -1)
        for b in torch.nonzero(second).flatten().tolist():
            expected[(a, b)] = first[a].item() * second[b].item()
    for counts in (spec, plain):
        assert set(counts) <= set(expected)
        tv = 0.5 * sum(abs(counts.get(key, 0) / n - p) for key, p in expected.items())
        assert tv < 0.08, tv
    # The drafts really were used: some accepted, some rejected.
    assert 0 < sum(r.stats.accepted for r in spec_results) < sum(r.stats.drafted for r in spec_results)
    assert sum(r.stats.drafted for r in plain_results) == 0


def _topk(logits: torch.Tensor, k: int) -> torch.Tensor:
    kth = torch.topk(logits, k).values[-1]
    return logits.masked_fill(logits < kth, float("-inf"))


def test_sampling_is_reproducible_with_seed(tiny_model, tiny_tokenizer):
    generator = SpeculativeGenerator(
        tiny_model, tiny_tokenizer, Drafter(None, DrafterConfig(mode=DraftMode.CONTEXT)), speculation_gate=False
    )
    params = SamplingParams(max_new_tokens=12, temperature=0.9, top_p=0.9, seed=42)
    assert generator.generate([[4, 5, 6]], params)[0].token_ids == generator.generate([[4, 5, 6]], params)[0].token_ids


def test_stop_strings_and_eos(tiny_model, tiny_tokenizer):
    generator = SpeculativeGenerator(
        tiny_model, tiny_tokenizer, Drafter(None, DrafterConfig(mode=DraftMode.CONTEXT)), speculation_gate=False
    )
    prompt = [20, 21, 22]
    full = generator.generate([prompt], SamplingParams(max_new_tokens=30))[0]
    if full.finish_reason == "stop":
        assert full.token_ids[-1] == 2
    text = full.text
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    assert stop
    cut = generator.generate([prompt], SamplingParams(max_new_tokens=30, stop=[stop]))[0]
    assert cut.finish_reason == "stop"
    assert cut.text == text[: text.find(stop)]
    assert cut.token_ids == full.token_ids[: len(cut.token_ids)]


def test_chat_prompt_uses_template(tiny_model, tiny_tokenizer):
    generator = SpeculativeGenerator(tiny_model, tiny_tokenizer, None, speculation_gate=False)
    messages = [{"role": "user", "content": "Blue Spice is a pub."}]
    expected = tiny_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert generator.encode(messages) == tiny_tokenizer(expected)["input_ids"]
    result = generator.generate([messages], SamplingParams(max_new_tokens=4))[0]
    assert result.prompt_tokens == len(generator.encode(messages))


def test_bad_requests(tiny_model, tiny_tokenizer):
    generator = SpeculativeGenerator(tiny_model, tiny_tokenizer, None, speculation_gate=False)
    with pytest.raises(PromptTooLongError, match="context"):
        generator.generate([[5] * 1024])
    with pytest.raises(ValueError, match="max_new_tokens"):
        generator.generate([[5]], SamplingParams(max_new_tokens=0))
    with pytest.raises(ValueError, match="empty"):
        generator.generate([[]])


def test_long_generation_compacts_cache(tiny_model, tiny_tokenizer):
    vocab = len(tiny_tokenizer)
    prompts = random_prompts(random.Random(3), vocab, 4)
    truths = {tuple(p): reference_greedy(tiny_model, p, 120) for p in prompts}
    generator = SpeculativeGenerator(
        tiny_model, tiny_tokenizer, OracleDrafter(truths, 0.3, vocab), compact_waste=0.2, speculation_gate=False
    )
    results = generator.generate(prompts, SamplingParams(max_new_tokens=120))
    assert [r.token_ids for r in results] == [truths[tuple(p)] for p in prompts]
    assert np.mean([r.stats.drafted for r in results]) > 0


def test_shared_prefix_is_prefilled_once_and_changes_nothing(tiny_model, tiny_tokenizer):
    rng = random.Random(11)
    vocab = len(tiny_tokenizer)
    header = [rng.randrange(3, vocab) for _ in range(40)]
    prompts = [header + [rng.randrange(3, vocab) for _ in range(rng.randint(1, 12))] for _ in range(6)]
    drafter = Drafter(None, DrafterConfig(mode=DraftMode.CONTEXT))
    cached = SpeculativeGenerator(tiny_model, tiny_tokenizer, drafter, max_batch_size=3, speculation_gate=False)
    uncached = SpeculativeGenerator(
        tiny_model, tiny_tokenizer, drafter, max_batch_size=3, prefix_cache_min_tokens=0, speculation_gate=False
    )
    params = SamplingParams(max_new_tokens=16)
    with_cache = cached.generate(prompts, params)
    assert cached.timings.cached_prompt_tokens == 40 * 6  # both batches of 3 reuse the 40-token header
    assert [r.token_ids for r in with_cache] == [r.token_ids for r in uncached.generate(prompts, params)]
    assert uncached.timings.cached_prompt_tokens == 0
    for prompt, result in zip(prompts, with_cache):
        assert result.token_ids == reference_greedy(tiny_model, prompt, 16)
    # a batch sharing only part of the header reuses that part; one sharing too little prefills in full
    partial = [header[:20] + [5] * 4, header[:20] + [6] * 3]
    cached.generate(partial, params)
    assert cached.timings.cached_prompt_tokens == 40 * 6 + 20 * 2
    assert [r.token_ids for r in cached.generate(partial, params)] == [
        reference_greedy(tiny_model, p, 16) for p in partial
    ]
    cached.generate([[7] * 30, [8] * 30], params)
    assert cached.timings.cached_prompt_tokens == 40 * 6 + 20 * 4


def test_single_prompt_requests_share_a_prefix_across_calls(tiny_model, tiny_tokenizer):
    """One prompt per call (an online endpoint): the second call finds the prefix it shares with the first and
    caches it; later calls reuse it. Outputs stay those of plain greedy decoding."""
    rng = random.Random(12)
    vocab = len(tiny_tokenizer)
    header = [rng.randrange(3, vocab) for _ in range(30)]
    requests = [header + [rng.randrange(3, vocab) for _ in range(rng.randint(2, 8))] for _ in range(4)]
    generator = SpeculativeGenerator(tiny_model, tiny_tokenizer, None, max_batch_size=4, speculation_gate=False)
    params = SamplingParams(max_new_tokens=8)
    outputs = [generator.generate([r], params)[0].token_ids for r in requests]
    assert outputs == [reference_greedy(tiny_model, r, 8) for r in requests]
    assert generator.timings.cached_prompt_tokens == 30 * 3  # the first call had nothing to compare with
    generator.generate([[9] * 40], params)  # an unrelated request neither uses nor breaks the kept prefix
    generator.generate([requests[0]], params)
    assert generator.timings.cached_prompt_tokens == 30 * 4


class OracleTreeDrafter(OracleDrafter):
    """Token trees around a known continuation: at each depth a wrong sibling and, with probability p_right, the
    right token (so the accepted path, when there is one, runs through branches in arbitrary slots)."""

    def __init__(self, truths, p_right: float, vocab: int, seed: int = 0) -> None:
        super().__init__(truths, p_right, vocab, seed)
        self.config = DrafterConfig(mode=DraftMode.CONTEXT, max_draft=5, tree_nodes=10)
        self.shapes: list[int] = []

    def propose(self, rows, limits=None, branching=False):
        trees, budget = [], self.config.tree_nodes
        for row, limit in zip(rows, limits):
            truth, done = self.truths[row.prompt], len(row.tokens) - len(row.prompt)
            tree, parent = DraftTree(), -1
            for depth in range(min(limit, 4)):
                right = truth[done + depth] if done + depth < len(truth) else 1
                wrong = (right + 1 + self.rng.randrange(self.vocab - 1)) % self.vocab
                pair = [wrong, right] if self.rng.random() < 0.5 else [right, wrong]
                if self.rng.random() >= self.p_right:
                    pair = [wrong, (wrong + 1) % self.vocab if (wrong + 1) % self.vocab != right else (wrong + 2)]
                for tok in pair:
                    if len(tree) < budget:
                        tree.tokens.append(tok)
                        tree.parents.append(parent)
                        tree.scores.append(0.9 ** (len(tree)))
                        tree.shares.append(0.5)
                        tree.keys.append(("context", 1, 0))
                nxt = [j for j in range(len(tree) - 2, len(tree)) if j >= 0 and tree.tokens[j] == right]
                if not nxt:
                    break
                parent = nxt[0]
            trees.append(tree)
            self.shapes.append(len(tree))
        return trees


@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("p_right", [1.0, 0.5])
def test_token_trees_keep_greedy_output_identical(tiny_model, tiny_tokenizer, p_right, fast):
    """Trees verified in one pass with a tree attention mask (fast forward and the model's own forward): the
    accepted path's cache slots are kept, its siblings' dropped, and the output equals plain greedy decoding."""
    vocab = len(tiny_tokenizer)
    rng = random.Random(7)
    prompts = random_prompts(rng, vocab, 5)
    truths = {tuple(p): reference_greedy(tiny_model, p, 30) for p in prompts}
    drafter = OracleTreeDrafter(truths, p_right, vocab)
    generator = SpeculativeGenerator(
        tiny_model, tiny_tokenizer, drafter, max_batch_size=3, fast_forward=fast, speculation_gate=False
    )
    generator.step_cost = FlatCosts()
    results = generator.generate(prompts, SamplingParams(max_new_tokens=30))
    for prompt, result in zip(prompts, results):
        assert result.token_ids == truths[tuple(prompt)]
    assert max(drafter.shapes) > 4  # real trees were verified (two nodes per depth)
    if p_right == 1.0:
        assert sum(r.stats.forward_passes for r in results) < sum(len(r.token_ids) for r in results) / 2


def test_ngram_trees_keep_greedy_output_identical(tiny_model, tiny_tokenizer, task_rows):
    outputs = [tiny_tokenizer(r["output"], add_special_tokens=False)["input_ids"] for r in task_rows[:200]]
    index = NgramIndex.build(outputs, max_order=4, tokenizer=tiny_tokenizer)
    drafter = Drafter(index, DrafterConfig(mode=DraftMode.MIXED, tree_nodes=12, min_path_prob=0.0))
    generator = SpeculativeGenerator(tiny_model, tiny_tokenizer, drafter, max_batch_size=4, speculation_gate=False)
    generator.step_cost = FlatCosts()
    prompts = [r["prompt"][-200:] for r in task_rows[200:208]]
    results = generator.generate(prompts, SamplingParams(max_new_tokens=20))
    for prompt, result in zip(prompts, results):
        assert result.token_ids == reference_greedy(tiny_model, tiny_tokenizer(prompt)["input_ids"], 20)
    assert sum(r.stats.drafted for r in results) > sum(r.stats.forward_passes for r in results)  # > 1 node a pass


class FlatCosts(StepCostTable):
    """A GPU-like cost: every pass costs the same, so the whole tree is verified."""

    def __call__(self, rows, q):
        return 1.0

    def observe(self, rows, q, seconds):
        pass

    def observe_ragged(self, rows, mean_q, longest, seconds, replace=False):
        pass


def test_trees_only_where_a_full_tree_is_cheap(tiny_model, tiny_tokenizer):
    """Trees where verifying tree_nodes + 1 tokens costs at most TREE_COST_RATIO plain steps (a GPU, batch 1 on a
    CPU), chains where it costs more; sampled rows branch too (one acceptance rule for both)."""
    drafter = Drafter(None, DrafterConfig(mode=DraftMode.CONTEXT, tree_nodes=16, min_path_prob=0.0))
    generator = SpeculativeGenerator(tiny_model, tiny_tokenizer, drafter, speculation_gate=False)
    prompt = [5, 6, 7, 5, 6, 8, 5, 6, 9, 5, 6]  # 5 6 continues three ways: a tree branches after it
    greedy = generator.request(prompt, SamplingParams(max_new_tokens=8))
    sampled = generator.request(prompt, SamplingParams(max_new_tokens=8, temperature=0.8))
    for row in (greedy, sampled):
        row.draft_context = drafter.new_row(row.prompt_ids)
        row.max_new = 8
    generator.step_cost = FlatCosts()
    trees = generator.proposer.propose([greedy, sampled])
    assert all(not tree.is_chain for tree in trees)
    steep = StepCostTable()
    for q in (1, 2, 4, 17):
        steep.set(2, q, 1.0 + 0.2 * (q - 1))  # 17 tokens cost 4.2 steps
    generator.step_cost = steep
    assert all(tree.is_chain for tree in generator.proposer.propose([greedy, sampled]))
