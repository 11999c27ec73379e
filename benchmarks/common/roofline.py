"""Roofline figures for decoding runs: the arithmetic and memory traffic a run needed, per second of its wall time,
against ceilings measured on this machine.

A decoder's step is a chain of products with the weights: every query token costs 2 x (matmul parameters) FLOPs, and
every batched pass reads every weight once (at the precision's bytes per weight) plus each row's KV cache. Dividing
those totals by a run's wall time says how close it came to the CPU's arithmetic ceiling (compute-bound: more query
tokens a pass cost more time) or to its memory ceiling (memory-bound: extra query tokens ride along for free), which
is what decides whether speculation can pay at that batch size. Attention's own FLOPs (~10% at a 600-token context
for SmolLM2-135M) are left out: the figures are the linear layers' FLOPs, a lower bound of the work done.

The ceilings are measured, not datasheet figures: compute, the engine's own product at the precision on a
[64 x 576] x [576 x 3072] problem (the MLP's shape at batch 8 with 7 draft tokens a row), the best of several runs;
memory, torch summing a 1 GiB float32 tensor (a read stream), the best of several.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

WEIGHT_BYTES = {"fp32": 4.0, "bf16": 2.0, "int8": 1.0, "w8a8": 1.0}


@dataclass
class ModelShape:
    """What one query token and one pass cost, from the model's configuration."""

    matmul_params: int  # weights of every linear layer, the output head included
    kv_bytes_per_token: int  # float32 keys and values of one token across all layers

    @classmethod
    def of(cls, model: nn.Module) -> ModelShape:
        params = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
        config = model.config
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        return cls(params, 2 * config.num_hidden_layers * kv_heads * head_dim * 4)


@dataclass
class Work:
    """What a run did: query tokens through the products, batched passes (each reading the weights once), and the
    KV cache slots those passes read (each row's context, summed over its passes)."""

    query_tokens: int
    passes: int
    kv_slots_read: int


def engine_work(results: list[Any], prompt_lengths: list[int], prefilled_tokens: int, passes: int) -> Work:
    """The work of an engine run: every row's verified query tokens (one a pass plus its drafts) and the prompt
    tokens it prefilled (not served from the prefix cache); the batched passes the scheduler ran; each row reading
    its context once a pass, taken at its mean length over the run (prompt plus half the output)."""
    query = prefilled_tokens + sum(r.stats.forward_passes + r.stats.drafted for r in results)
    kv = sum(r.stats.forward_passes * (n + len(r.token_ids) // 2) for r, n in zip(results, prompt_lengths))
    return Work(query, passes, kv)


def sequential_work(
    outputs: list[list[int]], prompt_lengths: list[int], batch_size: int, prefilled: bool = True
) -> Work:
    """The work of plain decoding in fixed batches (transformers' generate, llama.cpp): every row of a batch runs
    until the batch's longest output ends, one token a pass, after its prompt's prefill (left out where not
    `prefilled`: a decoder that reuses cached prompts and does not say how much); estimated from the output lengths
    (the decoders report no counters of their own)."""
    query = kv = passes = 0
    for start in range(0, len(outputs), batch_size):
        rows = outputs[start : start + batch_size]
        steps = max((len(o) for o in rows), default=0)
        passes += steps
        prompts = prompt_lengths[start : start + batch_size]
        query += sum(prompts) * prefilled + len(rows) * steps
        kv += sum(steps * (n + steps // 2) for n in prompts)
    return Work(query, passes, kv)


def roofline(work: Work, wall_s: float, shape: ModelShape, weight_bytes: float, ceilings: dict[str, float]) -> dict:
    """Achieved GFLOP/s (linear layers) and GB/s (weights once a pass, KV per row) over `wall_s`, and each as a
    share of the measured ceilings (`gflops`, `gbps`)."""
    gflops = 2 * shape.matmul_params * work.query_tokens / wall_s / 1e9
    gbytes = (work.passes * shape.matmul_params * weight_bytes + work.kv_slots_read * shape.kv_bytes_per_token) / 1e9
    gbps = gbytes / wall_s
    return {
        "gflops": round(gflops, 1),
        "gbps": round(gbps, 2),
        "compute_share": round(gflops / ceilings["gflops"], 3),
        "memory_share": round(gbps / ceilings["gbps"], 3),
    }


def memory_ceiling(gib: float = 1.0, repeats: int = 5) -> float:
    """GB/s of torch summing a `gib` GiB float32 tensor, the best of `repeats` (and of at least 0.5 s of runs)."""
    x = torch.ones(int(gib * 2**30) // 4)
    x.sum()  # touch every page first
    return x.numel() * 4 / _best_time(x.sum, repeats) / 1e9


def compute_ceiling(precision: str, m: int = 64, n: int = 3072, k: int = 576, repeats: int = 20) -> float:
    """GFLOP/s of the engine's product at `precision` on an [m, k] x [k, n] problem, the best of `repeats`
    (torch's float32 matmul where the CPU kernels did not build)."""
    from tasc_ray.engine.model.cpu_kernels import load_kernels

    x, w = torch.randn(m, k), torch.randn(n, k)
    kernels = load_kernels()
    if kernels is not None and precision in kernels.precisions:
        packed = kernels.pack(w, None, precision)
        call = lambda: kernels(x, packed)  # noqa: E731
    else:
        call = lambda: x @ w.T  # noqa: E731
    call()
    return 2 * m * n * k / _best_time(call, repeats) / 1e9


def measure_ceilings(precisions: list[str]) -> dict[str, dict[str, float]]:
    """Per precision, the compute ceiling; the memory ceiling is the machine's, shared."""
    gbps = round(memory_ceiling(), 2)
    return {p: {"gflops": round(compute_ceiling(p), 1), "gbps": gbps} for p in precisions}


def _best_time(fn: Any, repeats: int, min_s: float = 0.5) -> float:
    """The shortest of at least `repeats` timed calls of `fn`, calling on until `min_s` seconds have passed (the
    best run is the one least disturbed by other work)."""
    best, start, n = float("inf"), time.perf_counter(), 0
    while n < repeats or time.perf_counter() - start < min_s:
        t0 = time.perf_counter()
        fn()
        best, n = min(best, time.perf_counter() - t0), n + 1
    return best
