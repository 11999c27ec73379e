"""The lean Llama-family forward: the model's logits through ragged steps and cache edits, greedy output equal to
model.generate, in-place key/value buffers, and a clean fallback for models it does not support."""

from __future__ import annotations

import copy
import logging
import random

import pytest
import torch
from transformers import DynamicCache, GPT2Config, GPT2LMHeadModel, Qwen2Config, Qwen2ForCausalLM

from tasc_ray.engine.generator import SamplingParams, SpeculativeGenerator
from tasc_ray.engine.kv_cache import attention_mask, compact, select_rows
from tasc_ray.engine.model.fast_forward import FastForward, append_kv, build_fast_forward, unsupported_reason
from tests.engine.test_generator import OracleDrafter, random_prompts, reference_greedy


def _model_logits(model, ids, valid, positions, cache):
    mask = attention_mask(valid, ids.shape[1], model.dtype)
    return model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True).logits


@torch.inference_mode()
def test_logits_match_the_model_through_ragged_steps_and_cache_edits(tiny_model):
    fast = build_fast_forward(tiny_model)
    assert isinstance(fast, FastForward)
    rng = torch.Generator().manual_seed(0)
    vocab = tiny_model.config.vocab_size
    ours, theirs = DynamicCache(config=tiny_model.config), DynamicCache(config=tiny_model.config)
    valid = torch.ones(3, 9, dtype=torch.bool)
    valid[1, :4] = valid[2, :1] = False  # left-padded prompts
    ids = torch.randint(vocab, (3, 9), generator=rng)
    positions = (valid.long().cumsum(-1) - 1).clamp(min=0)
    got, want = fast(ids, valid, positions, ours), _model_logits(tiny_model, ids, valid, positions, theirs)
    torch.testing.assert_close(got[valid], want[valid], atol=1e-4, rtol=1e-4)
    next_pos = valid.sum(-1)
    for step in range(6):
        lengths = [random.Random(step * 3 + r).randint(0, 4) for r in range(valid.shape[0])]
        q = max(lengths) + 1
        step_valid = torch.tensor([[1] * (n + 1) + [0] * (q - n - 1) for n in lengths], dtype=torch.bool)
        ids = torch.randint(vocab, (valid.shape[0], q), generator=rng)
        positions = next_pos[:, None] + torch.arange(q)
        valid = torch.cat([valid, step_valid], 1)
        got, want = fast(ids, valid, positions, ours), _model_logits(tiny_model, ids, valid, positions, theirs)
        torch.testing.assert_close(got[step_valid], want[step_valid], atol=1e-4, rtol=1e-4)
        valid[:, -q:] &= torch.arange(q)[None] <= torch.tensor([n // 2 for n in lengths])[:, None]  # rejections
        next_pos = next_pos + torch.tensor([n // 2 + 1 for n in lengths])
        if step == 1:
            for cache in (ours, theirs):
                cache.crop(-1)
            valid = valid[:, :-1]
            next_pos = torch.minimum(next_pos, valid.sum(-1))
        if step == 2:  # a row leaves the batch
            keep = torch.tensor([0, 2])
            for cache in (ours, theirs):
                select_rows(cache, keep)
            valid, next_pos = valid[keep], next_pos[keep]
        if step == 4:
            new_valid = compact(ours, valid)
            compact(theirs, valid)
            valid = new_valid


def test_greedy_identical_to_generate_with_drafts(tiny_model, tiny_tokenizer):
    vocab = len(tiny_tokenizer)
    prompts = random_prompts(random.Random(3), vocab, 7)
    truths = {tuple(p): reference_greedy(tiny_model, p, 24) for p in prompts}
    generator = SpeculativeGenerator(
        tiny_model,
        tiny_tokenizer,
        OracleDrafter(truths, 0.6, vocab, 1),
        max_batch_size=3,
        fast_forward=True,
        speculation_gate=False,
    )
    assert generator.fast_forward is not None
    results = generator.generate(prompts, SamplingParams(max_new_tokens=24))
    assert [r.token_ids for r in results] == [truths[tuple(p)] for p in prompts]
    assert sum(r.stats.accepted for r in results) > 0


def test_qwen2_with_projection_biases(tiny_tokenizer):
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=len(tiny_tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        initializer_range=0.2,
        eos_token_id=2,
        pad_token_id=0,
    )
    model = Qwen2ForCausalLM(config).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.bias.normal_(0, 0.5)
            layer.self_attn.v_proj.bias.normal_(0, 0.5)
    generator = SpeculativeGenerator(model, tiny_tokenizer, None, max_batch_size=2, speculation_gate=False)
    assert generator.fast_forward is not None
    prompts = random_prompts(random.Random(5), len(tiny_tokenizer), 3)
    results = generator.generate(prompts, SamplingParams(max_new_tokens=12, ignore_eos=True))
    assert [r.token_ids for r in results] == [reference_greedy(model, p, 12) for p in prompts]


def test_keys_and_values_are_appended_in_place():
    cache = DynamicCache()
    layer = cache.layers[0] if cache.layers else None
    if layer is None:  # a cache without a config grows its layers on first update
        cache.update(torch.zeros(2, 1, 0, 4), torch.zeros(2, 1, 0, 4), 0)
        layer = cache.layers[0]
    k, v = append_kv(layer, torch.randn(2, 1, 5, 4), torch.randn(2, 1, 5, 4))
    first = k.data_ptr()
    for _ in range(3):
        new_k = torch.randn(2, 1, 2, 4)
        k, v = append_kv(layer, new_k, new_k.clone())
        assert k.data_ptr() == first and torch.equal(k[:, :, -2:], new_k) and torch.equal(v[:, :, -2:], new_k)
    assert k.shape[2] == 11
    layer.crop(-3)
    k, _ = append_kv(layer, torch.ones(2, 1, 1, 4), torch.ones(2, 1, 1, 4))
    assert k.shape[2] == 9 and k.data_ptr() == first and torch.equal(k[:, :, -1], torch.ones(2, 1, 4))
    kept = k[:, :, :-1].clone()
    select_rows(cache, torch.tensor([1]))  # the layer's tensors replaced: a new buffer, same contents
    k, _ = append_kv(layer, torch.zeros(1, 1, 1, 4), torch.zeros(1, 1, 1, 4))
    assert k.data_ptr() != first and torch.equal(k[:, :, :8], kept[1:])


def test_unsupported_models_keep_their_own_forward(tiny_model, tiny_tokenizer, caplog):
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=len(tiny_tokenizer), n_embd=32, n_layer=1, n_head=2)).eval()
    assert "model type 'gpt2'" in unsupported_reason(gpt2)
    with caplog.at_level(logging.INFO, logger="tasc_ray.engine.model.fast_forward"):
        generator = SpeculativeGenerator(gpt2, tiny_tokenizer, None, speculation_gate=False)
    assert generator.fast_forward is None and "fast forward not used (model type 'gpt2'" in caplog.text
    prompt = [5, 6, 7, 8]
    result = generator.generate([prompt], SamplingParams(max_new_tokens=6, ignore_eos=True))[0]
    assert result.token_ids == reference_greedy(gpt2, prompt, 6)

    adapted = copy.deepcopy(tiny_model)
    adapted.model.layers[0].mlp.up_proj = torch.nn.Sequential(adapted.model.layers[0].mlp.up_proj)
    assert "not plain nn.Linear" in unsupported_reason(adapted)


@pytest.mark.parametrize("batch", [1, 4])
def test_plain_decoding_matches_the_models_forward_path(tiny_model, tiny_tokenizer, batch):
    prompts = random_prompts(random.Random(11), len(tiny_tokenizer), batch)
    params = SamplingParams(max_new_tokens=16, speculative=False, ignore_eos=True)
    fast = SpeculativeGenerator(
        tiny_model, tiny_tokenizer, None, max_batch_size=batch, speculation_gate=False
    ).generate(prompts, params)
    slow = SpeculativeGenerator(
        tiny_model, tiny_tokenizer, None, max_batch_size=batch, fast_forward=False, speculation_gate=False
    )
    assert [r.token_ids for r in fast] == [r.token_ids for r in slow.generate(prompts, params)]


@pytest.mark.parametrize("precision", ["bf16", "int8", "w8a8"])
def test_reduced_precision_tasc_output_equals_plain_output_at_that_precision(tiny_model, tiny_tokenizer, precision):
    """Lossless within a precision: with bf16, int8 or w8a8 products, TASC (chains and trees, at batch 1 and 3, ragged
    drafts) emits exactly what plain decoding at that precision emits, and plain decoding does not depend on the
    batch."""
    from tasc_ray.engine.config import DrafterConfig, DraftMode
    from tasc_ray.engine.drafts.drafter import Drafter
    from tasc_ray.engine.model.fast_forward import build_fast_forward, supported_precisions

    if precision not in supported_precisions():
        pytest.skip(f"{precision} products need the CPU kernel and AVX512-BF16 (w8a8: AVX512-VNNI)")
    fast = build_fast_forward(tiny_model, precision)
    assert fast is not None and fast.precision == precision
    vocab = len(tiny_tokenizer)
    prompts = [p + p for p in random_prompts(random.Random(5), vocab, 6)]  # repeats: the context drafts
    params = SamplingParams(max_new_tokens=20)
    plain = SpeculativeGenerator(tiny_model, tiny_tokenizer, None, max_batch_size=1, fast_forward=fast)
    expected = [r.token_ids for r in plain.generate(prompts, params)]
    batched = SpeculativeGenerator(tiny_model, tiny_tokenizer, None, max_batch_size=3, fast_forward=fast)
    assert [r.token_ids for r in batched.generate(prompts, params)] == expected
    for batch, nodes in ((1, 12), (3, 0), (3, 12)):
        drafter = Drafter(None, DrafterConfig(mode=DraftMode.CONTEXT, tree_nodes=nodes, min_path_prob=0.0))
        spec = SpeculativeGenerator(
            tiny_model, tiny_tokenizer, drafter, max_batch_size=batch, fast_forward=fast, speculation_gate=False
        )
        results = spec.generate(prompts, params)
        assert [r.token_ids for r in results] == expected, (batch, nodes)
        assert sum(r.stats.drafted for r in results) > 0


def test_an_unavailable_precision_is_one_clear_error(tiny_model):
    from tasc_ray.engine.model.fast_forward import FastForward

    with pytest.raises(ValueError, match="precision 'int3' is unknown .*supported on this machine: fp32"):
        FastForward(tiny_model, precision="int3")


def _row_logits_in(fast, config, prompts, steps, chunk):
    """Logits of every row's `steps` tokens after its prompt, the prompts left-padded into one prefill and the
    steps verified `chunk` tokens a pass (ragged: row r's last passes carry fewer real tokens)."""
    b, longest = len(prompts), max(len(p) for p in prompts)
    valid = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompts], dtype=torch.bool)
    ids = torch.tensor([[0] * (longest - len(p)) + p for p in prompts])
    positions = (valid.long().cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache(config=config)
    prefill = fast(ids, valid, positions, cache)
    out = [[prefill[r, -1:]] for r in range(b)]
    done = [0] * b
    while any(d < len(s) for d, s in zip(done, steps)):
        take = [min(chunk, len(s) - d) for d, s in zip(done, steps)]
        q = max(take)
        step = torch.tensor([s[d : d + n] + [0] * (q - n) for s, d, n in zip(steps, done, take)])
        step_valid = torch.tensor([[1] * n + [0] * (q - n) for n in take], dtype=torch.bool)
        pos = torch.tensor([len(p) + d for p, d in zip(prompts, done)])[:, None] + torch.arange(q)
        valid = torch.cat([valid, step_valid], 1)
        logits = fast(step, valid, pos, cache)
        for r, n in enumerate(take):
            out[r].append(logits[r, :n])
            done[r] += n
    return [torch.cat(rows) for rows in out]


@pytest.mark.parametrize("precision", ["fp32", "bf16", "int8", "w8a8"])
def test_a_rows_logits_do_not_depend_on_its_batch_or_query_count(tiny_model, precision):
    """Batch-invariant kernels: row 0's logits are bit-identical whether it decodes alone one token a pass or
    verifies several tokens a pass beside 1-7 other rows with other prompt lengths and ragged drafts (passes of
    M = 1, 2, 9, 16 and 64 query tokens)."""
    from tasc_ray.engine.model.fast_forward import supported_precisions

    if precision not in supported_precisions():
        pytest.skip(f"{precision} products are not available on this machine")
    fast = FastForward(tiny_model, precision=precision)
    if not fast.batch_invariant:
        pytest.skip("the batch-invariant CPU kernels are not available here")
    rng = random.Random(3)
    vocab = tiny_model.config.vocab_size

    def tokens(n):
        return [rng.randrange(3, vocab) for _ in range(n)]

    prompt, steps = tokens(19), tokens(8)
    (alone,) = _row_logits_in(fast, tiny_model.config, [prompt], [steps], chunk=1)
    for rows, chunk in ((2, 1), (3, 3), (2, 8), (8, 8)):  # M = 2, 9, 16, 64 in the first step pass
        prompts = [prompt] + [tokens(rng.randrange(5, 40)) for _ in range(rows - 1)]
        step_tokens = [steps] + [tokens(rng.randrange(1, 12)) for _ in range(rows - 1)]
        got = _row_logits_in(fast, tiny_model.config, prompts, step_tokens, chunk)[0]
        assert torch.equal(got, alone), (rows, chunk, float((got - alone).abs().max()))
