"""`python -m benchmarks spec`: TASC-spec against plain greedy decoding and transformers' prompt lookup, side by side.

For each task, every method decodes the same prompts with the same model, batch size and max_new_tokens in
one process, one after another; speed is reported as ratios to `plain` at the same batch size. The index is
built from a split disjoint from the timed prompts: the reference outputs, and with --corpus-from-model N
also the model's own greedy outputs on N prompts of that split (cached on disk), which is what a served
task's logs hold. Methods:

- plain: greedy decoding through the same loop with no draft
- hf_generate: transformers' `model.generate`, greedy, the same prompts, batch size (left-padded) and limits:
  what users know, to place the engine's own plain decoding
- prompt_lookup_hf: `model.generate(prompt_lookup_num_tokens=...)` (transformers; batch 1 only)
- llama_cpp: llama.cpp (llama-cpp-python, the optional `bench` extra, built from source) decoding the bundled GGUF
  (SmolLM2-135M-Instruct Q4_1, the file the engine's fp32 model is dequantised from) greedily from the same prompt
  tokens, one prompt at a time, reusing its KV cache for the prefix a prompt shares with the previous one (its
  prompt cache); batch 1 only; --model smollm2-135m only; what a CPU user would run instead
- tasc_context / tasc_corpus / tasc_mixed: TASC-spec drafting from the context, the corpus index, or both
- tasc_chain: tasc_mixed with one chain per row (no token trees)
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from benchmarks.common.metrics import share_identical, task_quality
from benchmarks.common.report import provenance, write_report
from benchmarks.common.roofline import (
    WEIGHT_BYTES,
    ModelShape,
    Work,
    engine_work,
    measure_ceilings,
    roofline,
    sequential_work,
)
from benchmarks.common.tasks import BUILTIN_TASKS, Task, load_task, load_task_file
from tasc_ray.cli.args import add_config_arguments, add_model_argument, config_from_args
from tasc_ray.engine.config import DrafterConfig, DraftMode
from tasc_ray.engine.cost import StepCostTable
from tasc_ray.engine.drafts.drafter import Drafter
from tasc_ray.engine.drafts.index import DEFAULT_MAX_ORDER, NgramIndex, tokenizer_fingerprint
from tasc_ray.engine.generator import GenerationResult, SamplingParams, SpeculativeGenerator
from tasc_ray.engine.model.fast_forward import FastForward, build_fast_forward
from tasc_ray.engine.model.packed_linear import pack_linear_layers
from tasc_ray.engine.outputs import cut_at_eos, find_stop
from tasc_ray.models import load_model

logger = logging.getLogger(__name__)

METHODS = (
    "plain",
    "hf_generate",
    "prompt_lookup_hf",
    "llama_cpp",
    "tasc_context",
    "tasc_corpus",
    "tasc_mixed",
    "tasc_chain",
)
BATCH_1_ONLY = ("prompt_lookup_hf", "llama_cpp")
PRECISION_FREE = ("hf_generate", "prompt_lookup_hf", "llama_cpp")  # not the engine's: run once, not per precision
MODES = {
    "tasc_context": DraftMode.CONTEXT,
    "tasc_corpus": DraftMode.CORPUS,
    "tasc_mixed": DraftMode.MIXED,
    "tasc_chain": DraftMode.MIXED,
}
HF_LOOKUP_TOKENS = 10


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "spec",
        help="TASC-spec speed vs plain greedy and HF prompt lookup",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_argument(p)
    p.add_argument(
        "--task",
        action="append",
        default=None,
        help=f"built-in task ({', '.join(BUILTIN_TASKS)}) or a parquet with prompt/reference columns "
        "(repeatable; default: all built-in tasks)",
    )
    p.add_argument("--corpus", help="corpus file (parquet/jsonl) for a parquet --task")
    p.add_argument("--corpus-column", default="output")
    p.add_argument("--n", type=int, default=16, help="timed prompts per task")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--batch-sizes", default="1,8")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument(
        "--corpus-from-model",
        type=int,
        default=0,
        metavar="N",
        help="also index the model's own greedy outputs on N prompts of the disjoint split",
    )
    p.add_argument("--corpus-limit", type=int, default=None, help="at most this many reference outputs to index")
    p.add_argument("--max-order", type=int, default=DEFAULT_MAX_ORDER)
    add_config_arguments(p, DrafterConfig, exclude={"mode"})  # each method sets the mode
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument(
        "--precisions",
        default="fp32",
        help="the fast forward's product precisions to run side by side, comma-separated (fp32, bf16): each with "
        "its own plain decoding, and its outputs compared with fp32 plain decoding's",
    )
    p.add_argument("--device", default=None)
    p.add_argument(
        "--fast-forward",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the engine's lean forward (fast_forward.py), as load_engine does; without it, the model's own "
        "forward on oneDNN-packed linear layers (transformers' methods always run a pristine copy of the model)",
    )
    p.add_argument("--seed", type=int, default=0, help="which prompts are drawn")
    p.add_argument("--cache-dir", default="benchmarks/cache", help="where model-output corpora are cached")
    p.add_argument("--json", dest="json_path", metavar="FILE", help="write results JSON here (+ .md table, plots)")
    p.set_defaults(handler=run)


@dataclass
class Measured:
    results: list[GenerationResult] | None
    token_ids: list[list[int]]
    wall_s: float
    draft_s: float = 0.0
    work: Work | None = None  # for the roofline figures


def run(args: argparse.Namespace) -> dict[str, Any]:
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    methods = [m.strip() for m in args.methods.split(",")]
    unknown = set(methods) - set(METHODS)
    if unknown:
        raise ValueError(f"unknown method(s) {sorted(unknown)}; choose from {', '.join(METHODS)}")
    precisions = [p.strip() for p in args.precisions.split(",")]
    model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device)
    hf_model = model  # transformers' own methods run the model as loaded
    forwards: dict[str, FastForward | bool] = {}
    for precision in precisions:  # as load_engine builds them; a precision this machine lacks is a ValueError
        fast = build_fast_forward(model, precision) if args.fast_forward else None
        if fast is None and precision != "fp32":
            raise ValueError(f"precision {precision!r} needs the fast forward (--fast-forward), which did not apply")
        forwards[precision] = fast if fast is not None else False
    if not any(forwards.values()):  # as load_engine does; transformers' methods keep a pristine copy
        hf_model, _ = load_model(args.model, dtype=args.dtype, device=args.device)
        pack_linear_layers(model)
    first = forwards[precisions[0]]
    tasks = args.task or list(BUILTIN_TASKS)
    cost_tables = {p: cost_table(model, tokenizer, max(batch_sizes), f) for p, f in forwards.items()}
    report: dict[str, Any] = {
        "model": args.model,
        "dtype": args.dtype,
        "device": str(model.device),
        "torch_threads": torch.get_num_threads(),
        **provenance("spec"),
        "config": {k: v for k, v in vars(args).items() if k not in ("handler", "json")},
        "runs": [],
        "forward": f"fast ({first.mode} products)" if first else "model's own, oneDNN-packed linear layers",
        "precisions": precisions,
        "cost_table": cost_tables[precisions[0]],
        "cost_tables": cost_tables,
        "roofline_ceilings": measure_ceilings(precisions),
    }
    for task_name in tasks:
        task = (
            load_task_file(task_name, args.n, args.corpus, args.corpus_column)
            if task_name.endswith(".parquet")
            else load_task(task_name, args.n, args.seed, args.corpus_limit)
        )
        corpora = {"reference": task.corpus}
        if args.corpus_from_model:
            corpora["model"] = model_outputs(model, tokenizer, task, args, first)
        indexes = {
            kind: NgramIndex.from_texts(texts, tokenizer, args.max_order) for kind, texts in corpora.items() if texts
        }
        fp32_plain: dict[int, list[list[int]]] = {}  # batch size -> fp32 plain outputs, to place other precisions
        for n, precision in enumerate(precisions):
            models = (model, hf_model, forwards[precision])
            own = methods if n == 0 else [m for m in methods if m not in PRECISION_FREE]
            ceilings = report["roofline_ceilings"]
            runs = bench_task(models, tokenizer, task, indexes, own, batch_sizes, args, fp32_plain, precision, ceilings)
            report["runs"] += runs
    if args.json_path:
        write_spec_report(report, Path(args.json_path))
    print(markdown_table(report))
    return report


def bench_task(
    models: tuple[Any, Any, FastForward | bool],
    tokenizer,
    task: Task,
    indexes: dict[str, NgramIndex],
    methods: list[str],
    batch_sizes: list[int],
    args: argparse.Namespace,
    fp32_plain: dict[int, list[list[int]]] | None = None,
    precision: str = "fp32",
    ceilings: dict[str, dict[str, float]] | None = None,
) -> list[dict[str, Any]]:
    """Every method on the task's prompts at every batch size; `models` is (the engine's model, transformers'
    own, the engine's fast forward at `precision` or False). `fp32_plain` (batch size -> outputs) is filled by the
    fp32 pass and read by the others: how often another precision's outputs equal fp32's. With `ceilings`
    (precision -> measured GFLOP/s and GB/s), each run gets its roofline figures."""
    fp32_plain = {} if fp32_plain is None else fp32_plain
    model, hf_model, forward = models
    params = SamplingParams(max_new_tokens=args.max_new_tokens, stop=task.stop)
    prompt_lengths = [len(tokenizer(p)["input_ids"]) for p in task.prompts]
    shape = ModelShape.of(model)
    runs = []
    for batch_size in batch_sizes:
        plain_gen = SpeculativeGenerator(model, tokenizer, None, max_batch_size=batch_size, fast_forward=forward)
        # Every engine generator is warmed up alike on prompts of the disjoint split: the allocator's buffers at this
        # batch size, and the shared few-shot prefix in its prefix cache (TASC's live overlay also learns those
        # outputs, as a running server would have).
        warmup = task.corpus_prompts[:batch_size] or task.prompts[:batch_size]
        warm_outputs = [r.token_ids for r in plain_gen.generate(warmup, params)]
        plain_gen.profile_step_costs()  # as load_engine does at start-up; every TASC generator starts from it
        plain = measure_engine(plain_gen, task.prompts, params, prompt_lengths)
        if precision == "fp32":
            fp32_plain[batch_size] = plain.token_ids
        for method in methods:
            if method in BATCH_1_ONLY and batch_size != 1:
                continue
            uses_corpus = method in ("tasc_corpus", "tasc_mixed", "tasc_chain")
            corpus_choices = indexes.items() if uses_corpus else [(None, None)]
            for corpus_kind, index in corpus_choices:
                logger.info("%s: %s batch %d, corpus %s", task.name, method, batch_size, corpus_kind)
                if method == "plain":
                    measured = plain
                elif method == "hf_generate":
                    measured = measure_hf_generate(hf_model, tokenizer, task.prompts, params, batch_size)
                    measured.work = sequential_work(measured.token_ids, prompt_lengths, batch_size)
                elif method == "prompt_lookup_hf":
                    measured = measure_hf_lookup(hf_model, tokenizer, task.prompts, params)
                elif method == "llama_cpp":
                    measured = measure_llama_cpp(args.model, tokenizer, model, task.prompts, params)
                    # its prompt cache serves what a prompt shares with the previous one: prefill left uncounted
                    measured.work = sequential_work(measured.token_ids, prompt_lengths, 1, prefilled=False)
                else:
                    trees = {"tree_nodes": 0} if method == "tasc_chain" else {}
                    config = config_from_args(DrafterConfig, args, mode=MODES[method], **trees)
                    drafter = Drafter(index, config)
                    generator = SpeculativeGenerator(  # as load_engine builds it
                        model,
                        tokenizer,
                        drafter,
                        max_batch_size=batch_size,
                        fast_forward=forward,
                        speculation_gate=True,
                    )
                    generator.step_cost = copy.deepcopy(plain_gen.step_cost)
                    generator.generate(warmup, params)
                    measured = measure_engine(generator, task.prompts, params, prompt_lengths)
                record = run_record(task, method, batch_size, corpus_kind, measured, plain)
                record["precision"] = precision
                if ceilings and measured.work is not None:
                    own = method not in PRECISION_FREE  # transformers' methods run float32 torch
                    weight_bytes = WEIGHT_BYTES[precision] if own else 4.0
                    if method == "llama_cpp":
                        weight_bytes = llama_cpp_weight_bytes(args.model, shape)
                    ceiling = ceilings[precision if own else "fp32"]
                    record["roofline"] = roofline(measured.work, measured.wall_s, shape, weight_bytes, ceiling)
                texts = [tokenizer.decode(ids, skip_special_tokens=True) for ids in measured.token_ids]
                record["quality_metric"], score = task_quality(task.name, texts, task.references)
                record["quality"] = round(score, 2)
                if batch_size in fp32_plain:
                    record["match_rate_vs_fp32_plain"] = share_identical(measured.token_ids, fp32_plain[batch_size])
                if method.startswith("tasc") and batch_size == 1:
                    replay = (warmup, warm_outputs, task.prompts, plain.token_ids)
                    record["simulated_tokens_per_pass"] = predicted_tokens_per_pass(
                        tokenizer, index, config, replay, plain_gen.step_cost
                    )
                runs.append(record)
    return runs


COST_QUERIES = (1, 2, 4, 6, 9, 16, 32)
COST_CONTEXT = 600


def cost_table(model, tokenizer, max_batch: int, forward: FastForward | bool) -> dict[str, Any]:
    """Milliseconds of one forward pass by rows (1 and the largest batch) and query tokens per row, over a
    600-token KV cache (median of 5): what a verification pass costs against a plain step (q = 1)."""
    generator = SpeculativeGenerator(model, tokenizer, None, max_batch_size=max_batch, fast_forward=forward)
    table = generator.profile_step_costs(queries=COST_QUERIES, context=COST_CONTEXT, repeats=5)
    return {
        "context": COST_CONTEXT,
        "ms": {rows: {q: round(1000 * sec, 2) for q, sec in cells.items()} for rows, cells in table.items()},
    }


def measure_engine(
    generator: SpeculativeGenerator, prompts: list[str], params: SamplingParams, prompt_lengths: list[int]
) -> Measured:
    timings = generator.timings
    before = (timings.draft_s, timings.steps, timings.prompt_tokens - timings.cached_prompt_tokens)
    t0 = time.perf_counter()
    results = generator.generate(prompts, params)
    wall = time.perf_counter() - t0
    prefilled = timings.prompt_tokens - timings.cached_prompt_tokens - before[2]
    work = engine_work(results, prompt_lengths, prefilled, timings.steps - before[1])
    return Measured(results, [r.token_ids for r in results], wall, timings.draft_s - before[0], work)


def llama_cpp_weight_bytes(model_name: str, shape: ModelShape) -> float:
    """Bytes per matmul weight of the bundled GGUF llama.cpp reads (its file size over the weights: Q4_1 and the
    few tensors it keeps wider)."""
    from tasc_ray.models import _embedded_gguf

    return _embedded_gguf(model_name).stat().st_size / shape.matmul_params


@torch.inference_mode()
def measure_hf_generate(model, tokenizer, prompts: list[str], params: SamplingParams, batch_size: int) -> Measured:
    """transformers' greedy `model.generate` over the prompts in batches of `batch_size` (left-padded), the output
    cut where our engine cuts it (EOS or the stop string; the time spent past it still counts)."""
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    token_ids = []
    t0 = time.perf_counter()
    try:
        for start in range(0, len(prompts), batch_size):
            enc = tokenizer(prompts[start : start + batch_size], return_tensors="pt", padding=True).to(model.device)
            out = model.generate(
                **enc,
                max_new_tokens=params.max_new_tokens,
                do_sample=False,
                stop_strings=params.stop or None,
                tokenizer=tokenizer,
                pad_token_id=tokenizer.pad_token_id,
            )
            for row in out[:, enc["input_ids"].shape[1] :].tolist():
                token_ids.append(_cut_output(tokenizer, model, row, params))
    finally:
        tokenizer.padding_side = side
    return Measured(None, token_ids, time.perf_counter() - t0)


def _cut_output(tokenizer, model, ids: list[int], params: SamplingParams) -> list[int]:
    """A `generate` row as our engine emits it: up to and including the first EOS, cut at the first stop string."""
    eos = model.generation_config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos])
    ids, _ = cut_at_eos(ids, eos_ids)
    cut = find_stop(tokenizer, ids, params.stop) if params.stop else None
    return ids[: cut[0]] if cut else ids


@torch.inference_mode()
def measure_hf_lookup(model, tokenizer, prompts: list[str], params: SamplingParams) -> Measured:
    """transformers' prompt lookup decoding, one prompt at a time (it supports batch 1 only).

    transformers checks stop strings after each assisted step, so its output can run a few accepted tokens past
    the stop string: the output is cut where our engine cuts it (the time spent past it still counts)."""
    token_ids = []
    t0 = time.perf_counter()
    for prompt in prompts:
        enc = tokenizer(prompt, return_tensors="pt").to(model.device)
        out = model.generate(
            **enc,
            max_new_tokens=params.max_new_tokens,
            do_sample=False,
            prompt_lookup_num_tokens=HF_LOOKUP_TOKENS,
            stop_strings=params.stop or None,
            tokenizer=tokenizer,
        )
        token_ids.append(_cut_output(tokenizer, model, out[0, enc["input_ids"].shape[1] :].tolist(), params))
    return Measured(None, token_ids, time.perf_counter() - t0)


def measure_llama_cpp(model_name: str, tokenizer, model, prompts: list[str], params: SamplingParams) -> Measured:
    """llama.cpp decoding the bundled GGUF greedily (top-k 1), one prompt at a time from the same prompt tokens as
    the engine, cut where the engine cuts (EOS, stop string, max_new_tokens)."""
    try:
        from llama_cpp import Llama
    except ImportError as exc:
        raise RuntimeError(
            "method llama_cpp needs llama-cpp-python: pip install -e '.[bench]' (builds llama.cpp from source)"
        ) from exc
    from tasc_ray.models import EMBEDDED_MODELS, _embedded_gguf

    if model_name not in EMBEDDED_MODELS:
        raise ValueError(f"method llama_cpp runs the bundled GGUF of {', '.join(EMBEDDED_MODELS)}, not {model_name!r}")
    encoded = [tokenizer(p)["input_ids"] for p in prompts]
    llm = Llama(
        model_path=str(_embedded_gguf(model_name)),
        n_ctx=max(len(ids) for ids in encoded) + params.max_new_tokens + 8,
        n_threads=torch.get_num_threads(),
        n_batch=512,
        verbose=False,
    )
    eos = model.generation_config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos])
    token_ids = []
    t0 = time.perf_counter()
    for ids in encoded:
        out: list[int] = []
        for token in llm.generate(ids, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0):
            out.append(int(token))
            if token in eos_ids or len(out) >= params.max_new_tokens:
                break
            if params.stop and find_stop(tokenizer, out, params.stop, max(0, len(out) - 1)):
                break
        token_ids.append(_cut_output(tokenizer, model, out, params))
    return Measured(None, token_ids, time.perf_counter() - t0)


def run_record(
    task: Task, method: str, batch_size: int, corpus_kind: str | None, m: Measured, plain: Measured
) -> dict[str, Any]:
    new_tokens = sum(len(ids) for ids in m.token_ids)
    record: dict[str, Any] = {
        "task": task.name,
        "method": method,
        "batch_size": batch_size,
        "corpus": corpus_kind,
        "n_prompts": len(m.token_ids),
        "new_tokens": new_tokens,
        "wall_s": round(m.wall_s, 3),
        "tokens_per_s": round(new_tokens / m.wall_s, 2),
        "speedup_vs_plain": round(plain.wall_s / m.wall_s, 3),
        "match_rate_vs_plain": share_identical(m.token_ids, plain.token_ids),
        "mean_accepted_per_pass": None,
        "tokens_per_pass": None,
        "draft_time_share": None,
        "accepted_hist": None,
    }
    if m.results is not None:
        passes = sum(r.stats.forward_passes for r in m.results)
        hist: list[int] = []
        for r in m.results:
            hist += [0] * (len(r.stats.accepted_hist) - len(hist))
            for i, c in enumerate(r.stats.accepted_hist):
                hist[i] += c
        record.update(
            # drafted tokens accepted per verification pass, and new tokens per pass (+1 prefill pass a row)
            mean_accepted_per_pass=round(sum(r.stats.accepted for r in m.results) / max(passes, 1), 3),
            tokens_per_pass=round(new_tokens / (passes + len(m.results)), 3),
            draft_time_share=round(m.draft_s / m.wall_s, 4),
            accepted_hist=hist,
        )
    return record


def predicted_tokens_per_pass(
    tokenizer,
    index: NgramIndex | None,
    config: DrafterConfig,
    replay: tuple[list[str], list[list[int]], list[str], list[list[int]]],
    step_cost: StepCostTable,
) -> float:
    """The simulator's prediction of the engine's tokens per pass at batch 1: the model's own greedy outputs (the
    plain run's, identical to TASC's) replayed through a fresh drafter, after the same warm-up outputs, with drafts
    cut on the same start-up step costs; the first token of each output comes from its prefill pass, as in the
    engine, whose figure counts that pass."""
    from tasc_ray.engine.simulate import simulate_acceptance

    warm_prompts, warm_outputs, prompts, outputs = replay
    ids = [tokenizer(p)["input_ids"] for p in [*warm_prompts, *prompts]]
    outs = [*warm_outputs, *outputs]
    seqs = [o[1:] for o in outs]
    seeds = [p + o[:1] for p, o in zip(ids, outs)]
    sim = simulate_acceptance(
        index, seqs, config, seeds, batch_size=1, score_from=len(warm_outputs), step_cost=copy.deepcopy(step_cost)
    )
    return round(sum(len(o) for o in outputs) / (sim["passes"] + len(outputs)), 3)


def model_outputs(
    model, tokenizer, task: Task, args: argparse.Namespace, forward: FastForward | bool = False
) -> list[str]:
    """The model's own greedy outputs on N prompts of the disjoint split, cached on disk."""
    prompts = task.corpus_prompts[: args.corpus_from_model]
    key = hashlib.sha256(
        json.dumps(
            [tokenizer_fingerprint(tokenizer), str(model.config.to_dict()), args.max_new_tokens, prompts]
        ).encode()
    ).hexdigest()[:16]
    path = Path(args.cache_dir) / f"model-corpus-{task.name}-{len(prompts)}-{key}.json"
    if path.exists():
        return json.loads(path.read_text())
    # Greedy output is identical with or without drafts, so prompt lookup just makes logging faster.
    drafter = Drafter(None, DrafterConfig(mode=DraftMode.CONTEXT))
    generator = SpeculativeGenerator(model, tokenizer, drafter, fast_forward=forward)
    params = SamplingParams(max_new_tokens=args.max_new_tokens, stop=task.stop)
    texts = []
    for i in tqdm(range(0, len(prompts), 64), desc=f"{task.name}: logging model outputs"):
        texts += [r.text.strip() for r in generator.generate(prompts[i : i + 64], params)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(texts))
    return texts


TITLE = "TASC-spec against plain greedy decoding and transformers' prompt lookup"


def _fmt(v: Any) -> str:
    return "-" if v is None else (f"{v:.2f}" if isinstance(v, float) else str(v))


def markdown_table(report: dict[str, Any]) -> str:
    lines = [
        f"Model: {report['model']} ({report['dtype']}, {report['device']}, {report['torch_threads']} threads)",
        "",
        "| task | method | corpus | batch | tokens/s | speedup vs plain | tokens/pass | accepted/pass "
        "| draft share | match vs plain |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    by_precision = "precisions" in report  # results before precisions existed render as they were written
    if by_precision:
        lines[-2] = lines[-2].replace("| method |", "| method | precision |") + " match vs fp32 plain | quality |"
        lines[-1] += "---|---|---|"
    for r in report["runs"]:
        precision = f" {r.get('precision', 'fp32')} |" if by_precision else ""
        line = (
            f"| {r['task']} | {r['method']} |{precision} {r['corpus'] or '-'} | {r['batch_size']} | "
            f"{_fmt(r['tokens_per_s'])} | {_fmt(r['speedup_vs_plain'])}x | {_fmt(r['tokens_per_pass'])} | "
            f"{_fmt(r['mean_accepted_per_pass'])} | {_fmt(r['draft_time_share'])} | "
            f"{_fmt(r['match_rate_vs_plain'])} |"
        )
        quality = f" {r['quality_metric']} {_fmt(r['quality'])} |" if "quality" in r else " - |"
        lines.append(line + (f" {_fmt(r.get('match_rate_vs_fp32_plain'))} |{quality}" if by_precision else ""))
    lines += roofline_lines(report)
    tables = report.get("cost_tables") or ({"fp32": report["cost_table"]} if report.get("cost_table") else {})
    for precision, table in tables.items():
        lines += ["", *([f"Precision {precision}:", ""] if len(tables) > 1 else []), *cost_table_lines(table)]
    predicted = [r for r in report["runs"] if r.get("simulated_tokens_per_pass")]
    if predicted:
        lines += [
            "",
            "The simulator's prediction at batch 1 (the model's greedy outputs replayed through a fresh drafter, no "
            "model, drafts cut on the same step costs) against the engine's measured tokens per pass:",
            "",
            "| task | method | corpus | engine tokens/pass | predicted | error |",
            "|---|---|---|---|---|---|",
        ]
        for r in predicted:
            err = r["simulated_tokens_per_pass"] / r["tokens_per_pass"] - 1
            lines.append(
                f"| {r['task']} | {r['method']} | {r['corpus'] or '-'} | {r['tokens_per_pass']} | "
                f"{r['simulated_tokens_per_pass']} | {err:+.1%} |"
            )
    return "\n".join(lines)


def roofline_lines(report: dict[str, Any]) -> list[str]:
    """The roofline table: each run's achieved GFLOP/s and GB/s against the ceilings measured on this machine."""
    runs = [r for r in report["runs"] if r.get("roofline")]
    if not runs:
        return []
    ceilings = report["roofline_ceilings"]
    measured = ", ".join(f"{p} {c['gflops']:.0f} GFLOP/s" for p, c in ceilings.items())
    lines = [
        "",
        f"Roofline (benchmarks/common/roofline.py): linear-layer GFLOP/s and GB/s read (weights once a pass at the "
        f"precision's bytes, each row's KV cache) over each run's wall time, against ceilings measured here: the "
        f"engine's product {measured}; memory {next(iter(ceilings.values()))['gbps']:.1f} GB/s (hf_generate "
        "against the fp32 ceilings; llama_cpp's bytes are its GGUF's):",
        "",
        "| task | method | precision | batch | GFLOP/s | of compute ceiling | GB/s | of memory ceiling |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        f = r["roofline"]
        lines.append(
            f"| {r['task']} | {r['method']} | {r.get('precision', 'fp32')} | {r['batch_size']} | {f['gflops']:.1f} | "
            f"{f['compute_share']:.0%} | {f['gbps']:.2f} | {f['memory_share']:.0%} |"
        )
    return lines


def cost_table_lines(cost: dict[str, Any]) -> list[str]:
    ms = {int(rows): {int(q): v for q, v in cells.items()} for rows, cells in cost["ms"].items()}
    queries = sorted({q for cells in ms.values() for q in cells})
    lines = [
        f"Cost of one forward pass (ms, median) by query tokens per row q, over a {cost['context']}-token KV cache;"
        " in brackets, relative to q = 1 at the same rows:",
        "",
        "| rows | " + " | ".join(f"q={q}" for q in queries) + " |",
        "|---|" + "---|" * len(queries),
    ]
    for rows, cells in sorted(ms.items()):
        base = cells[queries[0]]
        lines.append(f"| {rows} | " + " | ".join(f"{cells[q]:.1f} ({cells[q] / base:.2f})" for q in queries) + " |")
    return lines


def write_spec_report(report: dict[str, Any], path: Path) -> None:
    """The JSON and markdown (common writer), and the plots next to them (.png)."""
    write_report(report, path, TITLE, markdown_table(report))
    plot(report, path.with_suffix(".png"))


def _label(run: dict[str, Any]) -> str:
    precision = run.get("precision", "fp32")
    return run["method"] + (f" ({run['corpus']})" if run["corpus"] else "") + (f" {precision}" * (precision != "fp32"))


def _speedup_panel(ax: Any, runs: list[dict[str, Any]], batch_size: int) -> None:
    """Bars of speedup vs plain by task, one per method (and corpus), at one batch size."""
    rows = [r for r in runs if r["batch_size"] == batch_size]
    labels = sorted({_label(r) for r in rows})
    tasks = sorted({r["task"] for r in rows})
    width = 0.8 / max(len(labels), 1)
    for j, label in enumerate(labels):
        speedup = {r["task"]: r["speedup_vs_plain"] for r in rows if _label(r) == label}
        values = [speedup.get(t, 0) for t in tasks]
        ax.bar([i + j * width for i in range(len(tasks))], values, width, label=label)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(tasks))], tasks)
    ax.set_title(f"speedup vs plain greedy, batch {batch_size}")
    ax.legend(fontsize=7)


def _histogram_panel(ax: Any, runs: list[dict[str, Any]], batch_size: int) -> None:
    """tasc_mixed's accepted-length distributions at one batch size."""
    for r in runs:
        if r["method"] == "tasc_mixed" and r["batch_size"] == batch_size and r["accepted_hist"]:
            total = sum(r["accepted_hist"])
            ax.plot(
                range(len(r["accepted_hist"])),
                [c / total for c in r["accepted_hist"]],
                marker="o",
                label=f"{r['task']} ({r['corpus']})",
            )
    ax.set_title(f"tasc_mixed: drafted tokens accepted per pass (batch {batch_size})")
    ax.set_xlabel("accepted draft tokens")
    ax.set_ylabel("share of passes")
    ax.legend(fontsize=7)


def plot(report: dict[str, Any], path: Path) -> None:
    """Speedup by task and method (one panel per batch size), and tasc_mixed's accepted-length histograms."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in report["runs"] if r["method"] != "plain"]
    batch_sizes = sorted({r["batch_size"] for r in runs})
    fig, axes = plt.subplots(1, len(batch_sizes) + 1, figsize=(6 * (len(batch_sizes) + 1), 4.5))
    for ax, batch_size in zip(axes, batch_sizes):
        _speedup_panel(ax, runs, batch_size)
    _histogram_panel(axes[-1], runs, batch_sizes[0])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
