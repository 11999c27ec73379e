"""`python -m benchmarks ft`: TASC-ft on a task, the original vocabulary against the enriched one under the same recipe.

A task is an E2E preset (`--direction text2mr` or `mr2text`, the default) or any pair of parquet files with `prompt`
and `reference` columns (`--train T.parquet --eval E.parquet`, local or s3://; `--eval` repeatable, `NAME=PATH`
names a split; `python -m benchmarks.ft_data` writes WikiSQL and the E2E presets as such files). For the task the
harness:

1. draws `--train-rows` training rows and up to `--eval-rows` prompts per evaluation split. The E2E presets split
   the E2E devset by meaning representation (MR): a fifth of its MRs are held out, training rows come from the
   rest, with short plain completion prompts (no few-shot: the models are fine-tuned):
   * `heldout`: devset rows whose MR no training row has (the task's own distribution, unseen outputs);
   * `test`: the E2E test set, a shifted distribution: half its restaurant names and most food values are not
     in the devset, whose only eatType value is "coffee shop" while most test MRs say "pub" or "restaurant";
2. enriches the vocabulary on the training outputs (with and, for the record, without the prefix-conflict
   filter) and measures tokens per output on each split's references by re-tokenising them;
3. fine-tunes the original model and the enriched one on Ray Train with the same recipe, steps and data;
4. decodes every split's prompts with each fine-tuned model, plainly and with TASC-spec (an n-gram index built
   from the training outputs with that model's own tokenizer, the engine's default drafter, speculation gate and
   measured pass costs), and reports wall time, speedup over the fine-tuned original-vocabulary model decoded
   plainly, tokens per generated output, the share of generated tokens that are new tokens, and task quality:
   exact match and chrF always, slot F1 where the references are MRs (exact match is then the same slot set),
   BLEU where they are not;
5. composes the two methods: TASC-ft + TASC-spec against the original model decoded plainly (the combined
   speedup) and against TASC-ft alone;
6. writes `<out-dir>/ft_<task>_<tag>.json` and `.md` (with the exact command, commit and machine).

On a machine without Ray, `--trainer local` trains in-process.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common.ft_tasks import FtTask, delta_intervals, load_task_files, metrics_for, score
from benchmarks.common.metrics import share_identical
from benchmarks.common.report import provenance, write_report
from benchmarks.common.tasks import load_e2e_splits, locate_datasets
from tasc_ray.ft.enrich import DEFAULT_MIN_COUNT
from tasc_ray.ft.train import (
    DEFAULT_NEW_TOKEN_ALIGN_LR,
    DEFAULT_NEW_TOKEN_ALIGN_STEPS,
    DEFAULT_NEW_TOKEN_DROPOUT,
    DEFAULT_NEW_TOKEN_LR_MULT,
)

logger = logging.getLogger(__name__)

E2E_DIR = locate_datasets() / "e2e"
DIRECTIONS = ("text2mr", "mr2text")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "ft",
        help="TASC-ft on a task (E2E presets, or --train/--eval parquet files): original vs enriched vocabulary, "
        "fine-tuned alike",
        description=__doc__,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_task_arguments(p)
    add_run_arguments(p)
    p.set_defaults(handler=run)
    from benchmarks import ft_compare, ft_eval, ft_nll, ft_recipe_auto, ft_vocab

    ft_vocab.register(subparsers, add_task_arguments)
    ft_recipe_auto.register(subparsers)
    ft_nll.register(subparsers, add_task_arguments)
    ft_compare.register(subparsers)
    ft_eval.register(subparsers)


def add_task_arguments(p: argparse.ArgumentParser) -> None:
    """The model and the task: an E2E preset or --train/--eval files, and how many rows of each."""
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument(
        "--direction",
        choices=DIRECTIONS,
        default=None,
        help="an E2E preset (default text2mr unless --train is given)",
    )
    p.add_argument("--train", default=None, help="training parquet with prompt and reference columns (local or s3://)")
    p.add_argument(
        "--eval",
        action="append",
        default=[],
        metavar="[NAME=]PATH",
        help="evaluation parquet with prompt and reference (a string or a list) columns; repeatable",
    )
    p.add_argument("--task-name", default=None, help="the task's name in the result (default: from --train)")
    p.add_argument("--stop", action="append", default=None, help="stop string of the outputs (default a newline)")
    p.add_argument("--data-dir", default=str(E2E_DIR), help="folder with devset.csv and testset_w_refs.csv")
    p.add_argument("--train-rows", type=int, default=256)
    p.add_argument("--eval-rows", type=int, default=48, help="prompts per evaluation split")
    p.add_argument("--holdout-fraction", type=float, default=0.2, help="share of devset MRs held out")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--train-seed",
        type=int,
        default=None,
        help="seed of the fine-tuning alone (initial state, batch order), to measure run-to-run noise on the same "
        "rows (default: --seed)",
    )


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    """Enrichment, fine-tuning and decoding settings of `bench ft`."""
    p.add_argument("--budget", type=int, default=500, help="most new tokens")
    p.add_argument("--max-n", type=int, default=8)
    p.add_argument("--per-iteration", type=int, default=50)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument(
        "--new-token-lr-mult",
        type=float,
        default=DEFAULT_NEW_TOKEN_LR_MULT,
        help="learning-rate multiplier for the new tokens' embedding rows (LoRA and full)",
    )
    p.add_argument(
        "--new-token-warmup-steps",
        type=int,
        default=0,
        help="steps that train the new tokens' rows alone before the schedule (the original model has none)",
    )
    p.add_argument(
        "--new-token-align-steps",
        type=int,
        default=DEFAULT_NEW_TOKEN_ALIGN_STEPS,
        help="steps that first teach the new tokens' rows to be read like their original spelling (label-free "
        "distillation from the model itself)",
    )
    p.add_argument(
        "--new-token-align-lr",
        type=float,
        default=DEFAULT_NEW_TOKEN_ALIGN_LR,
        help="Adam learning rate of the alignment steps",
    )
    p.add_argument(
        "--new-token-dropout",
        type=float,
        default=DEFAULT_NEW_TOKEN_DROPOUT,
        help="chance, at each step, that a new token of an output is spelled in its original tokens instead",
    )
    p.add_argument("--min-count", type=int, default=DEFAULT_MIN_COUNT, help="least occurrences of a new token's n-gram")
    p.add_argument(
        "--max-copied",
        type=float,
        default=1.0,
        help="drop new-token candidates carrying a value copied from the prompt in more than this share of their "
        "rows (1: off)",
    )
    p.add_argument(
        "--untie-embeddings",
        action="store_true",
        help="the enriched model gets an LM head of its own (new tokens' input and output rows learn apart)",
    )
    p.add_argument(
        "--distill",
        action="store_true",
        help="train the enriched model on the fine-tuned original-vocabulary model's greedy outputs for the training "
        "prompts (sequence-level distillation: learn to say what that model says, in fewer tokens) instead of on "
        "the references",
    )
    p.add_argument("--full", action="store_true", help="full fine-tuning instead of LoRA")
    p.add_argument(
        "--no-cross",
        action="append",
        default=[],
        metavar="SEP",
        help="a field separator new tokens may not span (repeatable)",
    )
    p.add_argument(
        "--key-end",
        action="append",
        default=[],
        metavar="END",
        help="a string ending a field's name (repeatable): new tokens may end with it, not go on past it",
    )
    p.add_argument("--num-workers", type=int, default=1)
    p.add_argument("--use-gpu", action="store_true", help="train on GPUs (Ray Train workers with use_gpu)")
    p.add_argument(
        "--trainer",
        choices=["ray", "local"],
        default="ray",
        help="Ray Train (default) or one in-process worker (machines without Ray)",
    )
    p.add_argument("--bf16", action="store_true", help="bf16 autocast in training and bf16 weights in decoding")
    p.add_argument("--device", default=None, help="decode device: cpu or cuda (default: cuda when present)")
    p.add_argument("--gen-batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument(
        "--reuse-original",
        default=None,
        metavar="WORK_DIR",
        help="an earlier run's work dir: reuse its fine-tuned original-vocabulary model (same training rows "
        "and recipe, checked) instead of training it again; it is still decoded in this run",
    )
    p.add_argument("--tag", default="cpu", help="suffix of the result files")
    p.add_argument("--work-dir", default="benchmarks/cache/ft", help="models and Ray storage (not committed)")
    p.add_argument("--out-dir", default="benchmarks/results")
    p.add_argument("--json", action="store_true")


# ----- decoding -----
def evaluate(model_dir: str, task: FtTask, args: argparse.Namespace, base_vocab: int) -> dict[str, dict[str, Any]]:
    """Decode each split's prompts plainly and with TASC-spec; time, tokens, new-token share, quality."""
    from tasc_ray.engine.drafts.index import NgramIndex
    from tasc_ray.models import load_model

    dtype = "bfloat16" if args.bf16 else "float32"
    model, tokenizer = load_model(model_dir, dtype=dtype, device=args.device)
    index = NgramIndex.from_texts([r["output"] for r in task.train], tokenizer)
    warmup = [r["prompt"] for r in task.train[:2]]
    results = {
        split: _decode_split(model, tokenizer, index, held, task, warmup, args, base_vocab)
        for split, held in task.splits.items()
    }
    del model
    return results


def _timed_generate(
    gen: Any, prompts: list[str], warmup: list[str], params: Any, device: Any
) -> tuple[list[Any], float]:
    """One warm-up call on two training prompts (not timed, and not among the timed prompts, so the drafter's live
    overlay cannot learn a timed output from it), then every prompt, timed (CUDA work synchronised at both ends)."""
    gen.generate(warmup, params)
    cuda = torch.cuda.is_available() and str(device).startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = gen.generate(prompts, params)
    if cuda:
        torch.cuda.synchronize()
    return out, time.perf_counter() - t0


def _generator(model: Any, tokenizer: Any, index: Any, speculative: bool, batch_size: int) -> Any:
    """A generator as `load_engine` builds one by default (fast forward; with TASC-spec: the default drafter, the
    speculation gate and the measured cost of a pass), over an already loaded model."""
    from tasc_ray.engine.config import DrafterConfig, EngineConfig
    from tasc_ray.engine.drafts.drafter import build_drafter
    from tasc_ray.engine.generator import SpeculativeGenerator

    engine = EngineConfig(max_batch_size=batch_size)
    gen = SpeculativeGenerator(model, tokenizer, build_drafter(index, DrafterConfig()) if speculative else None, engine)
    if speculative and engine.experimental.profile_step_costs:
        gen.profile_step_costs()
    return gen


def _decode_split(
    model: Any,
    tokenizer: Any,
    index: Any,
    held: list[dict[str, Any]],
    task: FtTask,
    warmup: list[str],
    args: argparse.Namespace,
    base_vocab: int,
) -> dict[str, Any]:
    from tasc_ray.engine.generator import SamplingParams

    prompts = [h["prompt"] for h in held]
    results: dict[str, Any] = {}
    texts_by_mode: dict[str, list[str]] = {}
    for mode in ("plain", "tasc_spec"):
        gen = _generator(model, tokenizer, index, mode == "tasc_spec", args.gen_batch_size)
        params = SamplingParams(max_new_tokens=args.max_new_tokens, stop=task.stop, speculative=mode == "tasc_spec")
        out, seconds = _timed_generate(gen, prompts, warmup, params, model.device)
        texts = [r.text.strip() for r in out]
        n_tokens = sum(r.new_tokens for r in out)
        n_new = sum(1 for r in out for t in r.token_ids if t >= base_vocab)
        passes = sum(r.stats.forward_passes for r in out)
        results[mode] = {
            "seconds": seconds,
            "tokens": n_tokens,
            "tokens_per_output": n_tokens / len(out),
            "tokens_per_s": n_tokens / seconds,
            "new_token_share": n_new / max(1, n_tokens),
            "forward_passes": passes,
            "tokens_per_pass": n_tokens / max(1, passes),
            "finish_length": sum(r.finish_reason == "length" for r in out),
            "samples": texts[:3],
            **score(texts, held, task.metrics),
        }
        if mode == "plain":  # every output, for the paired bootstrap of the quality deltas (and to read them)
            results[mode]["outputs"] = texts
        texts_by_mode[mode] = texts
    results["tasc_spec"]["matches_plain"] = share_identical(texts_by_mode["plain"], texts_by_mode["tasc_spec"])
    return results


# ----- the run -----
RECIPE_KEYS = (
    "model",
    "epochs",
    "lr",
    "lora_r",
    "lora_alpha",
    "full",
    "max_steps",
    "batch_size",
    "max_length",
    "weight_decay",
    "seed",
    "bf16",
)


def _original_summary_file(work: Path) -> Path:
    summary_file = work / "ft_original" / "finetune.json"
    if not summary_file.is_file():
        raise ValueError(f"--reuse-original {work}: no fine-tuned original model ({summary_file} is missing)")
    return summary_file


def reused_original(work: Path, cfg: Any, train: list[dict[str, str]]) -> dict[str, Any]:
    """The fine-tuning summary of an earlier run's original-vocabulary model, refused unless that run trained on
    the same rows with the same recipe (the model is then the one this run would train)."""
    import pandas as pd

    summary_file = _original_summary_file(work)
    if pd.read_parquet(work / "train.parquet").to_dict("records") != train:
        raise ValueError(f"--reuse-original {work}: its training rows differ from this run's")
    summary = json.loads(summary_file.read_text())
    differ = [k for k in RECIPE_KEYS if summary["config"].get(k) != getattr(cfg, k)]
    if differ:
        raise ValueError(f"--reuse-original {work}: its recipe differs in {', '.join(differ)}")
    logger.info("reusing the fine-tuned original-vocabulary model of %s", work)
    return summary | {"out": str(work / "ft_original"), "reused_from": str(work)}


def _check_args(args: argparse.Namespace) -> None:
    """Refuse a missing --reuse-original model before any work; pick the decode device."""
    if getattr(args, "reuse_original", None):
        _original_summary_file(Path(args.reuse_original))
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda was given but CUDA is not available")


def enrichment_config(args: argparse.Namespace) -> dict[str, Any]:
    """The enrichment settings of a run (EnrichConfig's keyword arguments)."""
    return dict(
        budget=args.budget,
        max_n=args.max_n,
        per_iteration=args.per_iteration,
        holdout=0.0,
        seed=args.seed,
        min_count=getattr(args, "min_count", DEFAULT_MIN_COUNT),
        no_cross=tuple(getattr(args, "no_cross", ())),
        key_end=tuple(getattr(args, "key_end", ())),
        max_copied=getattr(args, "max_copied", 1.0),
    )


def enrich_and_measure(
    args: argparse.Namespace,
    work: Path,
    train_outputs: list[str],
    splits: dict[str, list[dict[str, Any]]],
    prompts: list[str] | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Enrich the vocabulary on the training outputs with the prefix-conflict filter (the model fine-tuned, saved
    to work/enriched) and without it (compression only); tokens per reference on each split with each vocabulary.
    Returns the enrichment report and the compression summary."""
    from tasc_ray.ft.enrich import EnrichConfig, enrich_model

    config = EnrichConfig(**enrichment_config(args))
    untie = getattr(args, "untie_embeddings", False)
    report = enrich_model(args.model, train_outputs, work / "enriched", config, prompts=prompts, untie=untie)
    compression = {
        "new_tokens": report["n_new_tokens"],
        "iterations": len(report["iterations"]),
        "stop_reason": report["stop_reason"],
        "enrich_seconds": report["seconds"],
    }
    compression |= measure_compression(args, work, train_outputs, splits, prompts)
    logger.info("compression on the evaluation splits' references: %s", compression)
    return report, compression


def measure_compression(
    args: argparse.Namespace,
    work: Path,
    train_outputs: list[str],
    splits: dict[str, list[dict[str, Any]]],
    prompts: list[str] | None = None,
) -> dict[str, Any]:
    """Tokens per reference on each split with the original vocabulary, the enriched one (work/enriched) and the
    one enrichment would give without the prefix-conflict filter (built here, for the record)."""
    from tasc_ray.ft.enrich import EnrichConfig, count_tokens, enrich_tokenizer
    from tasc_ray.models import load_tokenizer

    base_tok = load_tokenizer(args.model)
    nofilter = enrich_tokenizer(
        base_tok,
        train_outputs,
        EnrichConfig(prefix_filter=False, **enrichment_config(args)),
        progress=False,
        prompts=prompts,
    )
    compression: dict[str, Any] = {"new_tokens_no_prefix_filter": len(nofilter.new_tokens)}
    tokenizers = {
        "original": base_tok,
        "enriched": load_tokenizer(str(work / "enriched")),
        "enriched_no_prefix_filter": nofilter.tokenizer,
    }
    for split, held in splits.items():
        refs = [r for h in held for r in h["refs"]]
        c: dict[str, Any] = {"references": len(refs)}
        for key, tok in tokenizers.items():
            c[f"tokens_per_output_{key}"] = count_tokens(tok, refs) / len(refs)
        for key in ("enriched", "enriched_no_prefix_filter"):
            c[f"reduction_{key}"] = 1 - c[f"tokens_per_output_{key}"] / c["tokens_per_output_original"]
        compression[split] = c
    return compression


TRAIN_SUMMARY_KEYS = (
    "recipe",
    "rows",
    "epochs_done",
    "steps",
    "final_loss",
    "train_seconds",
    "backend",
    "num_workers",
    "trainer",
    "new_token_alignment",
)


def finetune_config(args: argparse.Namespace, work: Path, name: str, model: str, train: Path | None = None) -> Any:
    """The one recipe both vocabularies are fine-tuned with (only the model, the output folder and, with
    --distill, the enriched model's training outputs differ)."""
    from tasc_ray.ft.train import FinetuneConfig

    return FinetuneConfig(
        model=model,
        train=str(train or work / "train.parquet"),
        out=str(work / f"ft_{name}"),
        epochs=args.epochs,
        lr=args.lr,
        lora_r=args.lora_r,
        full=args.full,
        new_token_lr_mult=getattr(args, "new_token_lr_mult", DEFAULT_NEW_TOKEN_LR_MULT),
        new_token_warmup_steps=getattr(args, "new_token_warmup_steps", 0),
        new_token_dropout=getattr(args, "new_token_dropout", DEFAULT_NEW_TOKEN_DROPOUT),
        new_token_align_steps=getattr(args, "new_token_align_steps", DEFAULT_NEW_TOKEN_ALIGN_STEPS),
        new_token_align_lr=getattr(args, "new_token_align_lr", DEFAULT_NEW_TOKEN_ALIGN_LR),
        num_workers=args.num_workers,
        use_gpu=args.use_gpu,
        bf16=args.bf16,
        max_steps=args.max_steps,
        batch_size=args.batch_size,
        seed=args.seed if getattr(args, "train_seed", None) is None else args.train_seed,
        storage_path=str((work / "ray").resolve()),
        name=f"ft-{name}",
        trainer=args.trainer,
        progress=True,
    )


def train_and_decode(args: argparse.Namespace, work: Path, task: FtTask, base_vocab: int) -> dict[str, Any]:
    """Fine-tune the original and the enriched model alike (or reuse an earlier run's original one), then decode
    every split with each. Returns {name: {"train": summary, "decode": per split and mode}}."""
    from tasc_ray.stages.finetune import finetune

    reuse = getattr(args, "reuse_original", None)
    runs: dict[str, Any] = {}
    original_out = ""
    for name, model in (("original", args.model), ("enriched", str(work / "enriched"))):
        distilled = None
        if name == "enriched" and getattr(args, "distill", False):
            distilled = distill_training_rows(original_out, task, args, work / "train_distilled.parquet")
        cfg = finetune_config(args, work, name, model, Path(distilled["train"]) if distilled else None)
        reusing = reuse and name == "original"
        summary = reused_original(Path(reuse), cfg, task.train) if reusing else finetune(cfg)
        original_out = original_out or summary["out"]
        runs[name] = {"train": {k: summary.get(k) for k in TRAIN_SUMMARY_KEYS}}
        if "reused_from" in summary:
            runs[name]["train"]["reused_from"] = summary["reused_from"]
        if distilled:
            runs[name]["train"]["distilled"] = distilled
        runs[name]["decode"] = evaluate(summary["out"], task, args, base_vocab)
        logger.info("%s: %s", name, json.dumps(runs[name], default=str)[:2000])
    return runs


def distill_training_rows(teacher: str, task: FtTask, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """The training prompts with the teacher's (the fine-tuned original-vocabulary model's) greedy outputs as their
    outputs, written to `out` for the enriched model to train on; an empty output, or one the length limit cut,
    keeps the reference. Returns where, and how the teacher's outputs compare with the references."""
    import pandas as pd

    from tasc_ray.engine.generator import SamplingParams
    from tasc_ray.models import load_model

    model, tokenizer = load_model(teacher, dtype="bfloat16" if args.bf16 else "float32", device=args.device)
    gen = _generator(model, tokenizer, None, False, args.gen_batch_size)
    params = SamplingParams(max_new_tokens=args.max_new_tokens, stop=task.stop)
    t0 = time.perf_counter()
    out_rows = gen.generate([r["prompt"] for r in task.train], params)
    seconds = time.perf_counter() - t0
    del model
    texts = [r.text.strip() for r in out_rows]
    usable = [bool(t) and r.finish_reason != "length" for t, r in zip(texts, out_rows)]
    rows = [{"prompt": r["prompt"], "output": t if ok else r["output"]} for r, t, ok in zip(task.train, texts, usable)]
    pd.DataFrame(rows).to_parquet(out)
    summary = {
        "train": str(out),
        "teacher": teacher,
        "seconds": seconds,
        "kept_reference": usable.count(False),
        "hit_length_limit": sum(r.finish_reason == "length" for r in out_rows),
        "equal_to_reference": share_identical(texts, [r["output"].strip() for r in task.train]),
    }
    logger.info("distilled training rows from %s: %s", teacher, summary)
    return summary


def load_task(args: argparse.Namespace) -> FtTask:
    """The task of the run: --train/--eval files, or an E2E preset (--direction, text2mr by default)."""
    if args.train:
        if args.direction:
            raise ValueError("give either --direction (an E2E preset) or --train/--eval files, not both")
        name = args.task_name
        if name is None and Path(args.train.rstrip("/")).stem == "train":  # .../wikisql/train.parquet -> wikisql
            name = Path(args.train.rstrip("/")).parent.name or None
        task = load_task_files(args.train, args.eval, args.train_rows, args.eval_rows, args.seed, name)
    else:
        if args.eval:
            raise ValueError("--eval needs --train (the E2E presets draw their own evaluation splits)")
        args.direction = args.direction or "text2mr"
        train, splits = load_e2e_splits(
            args.data_dir,
            args.direction,
            args.train_rows,
            args.eval_rows,
            args.seed,
            getattr(args, "holdout_fraction", 0.2),
        )
        metrics = QUALITY[args.direction]
        task = FtTask(args.task_name or args.direction, train, splits, metrics, description=E2E_SPLITS)
    if args.stop is not None:
        task.stop = list(args.stop)
    return task


def run(args: argparse.Namespace) -> dict[str, Any]:
    import pandas as pd

    from tasc_ray.models import load_tokenizer

    _check_args(args)
    header = provenance("ft")
    t_start = time.perf_counter()
    task = load_task(args)
    work = Path(args.work_dir) / f"{task.name}_{args.tag}_{int(time.time())}"
    work.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(task.train).to_parquet(work / "train.parquet")  # what finetune reads, and --reuse-original compares
    outputs, prompts = [r["output"] for r in task.train], [r["prompt"] for r in task.train]
    report, compression = enrich_and_measure(args, work, outputs, task.splits, prompts)
    runs = train_and_decode(args, work, task, base_vocab=len(load_tokenizer(args.model)))
    result = build_result(args, header, task, compression, runs, work, t_start)
    result["added_tokens_head"] = [t["token"] for t in report["new_tokens"][:40]]
    return write_result(result, args, task)


def build_result(
    args: argparse.Namespace,
    header: dict[str, Any],
    task: FtTask,
    compression: dict[str, Any],
    runs: dict[str, Any],
    work: Path,
    t_start: float,
) -> dict[str, Any]:
    """The result of a run: its provenance, task, recipe, compression, both models' training and decoding, and the
    quality deltas' bootstrap intervals (comparisons and targets are derived by `finalize`)."""
    return {
        "benchmark": "ft",
        "task": task.name,
        "direction": task.name,
        "task_description": task.description,
        "metrics": list(task.metrics),
        **header,
        "model": args.model,
        "device": args.device,
        "host": platform.node(),
        "torch_threads": torch.get_num_threads(),
        "train_rows": len(task.train),
        "eval_rows": {k: len(v) for k, v in task.splits.items()},
        "config": vars(args) | {"handler": None},
        "compression": compression,
        "runs": runs,
        "quality_intervals": quality_intervals(runs, task),
        "total_seconds": time.perf_counter() - t_start,
        "work_dir": str(work),
    }


def write_result(result: dict[str, Any], args: argparse.Namespace, task: FtTask) -> dict[str, Any]:
    finalize(result)
    stem = Path(args.out_dir) / f"ft_{task.name}_{args.tag}"
    write_report(result, stem.with_suffix(".json"), title(result), markdown(result))
    return result


def quality_intervals(runs: dict[str, Any], task: FtTask) -> dict[str, dict[str, list[float]]]:
    """Per split and metric, the 95% paired-bootstrap interval of the TASC-ft model's quality minus the original
    model's (both decoded plainly, on the same prompts)."""
    return {
        split: delta_intervals(
            runs["original"]["decode"][split]["plain"]["outputs"],
            runs["enriched"]["decode"][split]["plain"]["outputs"],
            held,
            task.metrics,
        )
        for split, held in task.splits.items()
    }


# quality metrics of the E2E presets (as before the generic path; the generic path adds chrF or exact match)
QUALITY = {"text2mr": ("exact_match", "slot_f1", "chrf"), "mr2text": ("exact_match", "bleu", "chrf", "slot_coverage")}
E2E_SPLITS = (
    "E2E devset rows, MRs not held out; `heldout`: devset rows whose MR no training row has (the task's "
    "distribution); `test`: the E2E test set (names and food values the devset lacks; eatType mostly "
    "pub/restaurant, which the devset never has)"
)
COMPOSITION_TARGET = 1.3


def result_metrics(result: dict[str, Any]) -> tuple[str, ...]:
    """The metrics a result was scored with (results written before the generic path: by direction)."""
    if result.get("metrics"):
        return tuple(result["metrics"])
    legacy = {"text2mr": ("exact_match", "slot_f1"), "mr2text": ("bleu", "chrf")}
    return legacy.get(result["direction"]) or metrics_for({})


def finalize(result: dict[str, Any]) -> dict[str, Any]:
    """Derive, per evaluation split, the comparisons against the fine-tuned original-vocabulary model decoded
    plainly (`<name>+<mode>`: speedup, token reduction, `<metric>_delta` in points, and for the TASC-ft model decoded
    plainly `<metric>_delta_ci95`, the bootstrap interval, where the result has one), the composition of TASC-ft
    with TASC-spec, and the target checks (compression and speed on the first split; quality and composition on
    every split)."""
    keys = result_metrics(result)
    runs, compression = result["runs"], result["compression"]
    comparisons: dict[str, Any] = {}
    for split in runs["original"]["decode"]:
        ref = runs["original"]["decode"][split]["plain"]
        comparisons[split] = {}
        for name in ("original", "enriched"):
            for mode in ("plain", "tasc_spec"):
                d = runs[name]["decode"][split][mode]
                comparisons[split][f"{name}+{mode}"] = {
                    "speedup": ref["seconds"] / d["seconds"],
                    "token_reduction": 1 - d["tokens_per_output"] / ref["tokens_per_output"],
                    **{f"{k}_delta": d[k] - ref[k] for k in keys if k in d and k in ref},
                }
        for k, interval in result.get("quality_intervals", {}).get(split, {}).items():
            comparisons[split]["enriched+plain"][f"{k}_delta_ci95"] = interval
        ft, ft_spec = runs["enriched"]["decode"][split]["plain"], runs["enriched"]["decode"][split]["tasc_spec"]
        comparisons[split]["composition"] = {
            "tasc_ft_speedup": ref["seconds"] / ft["seconds"],
            "tasc_spec_speedup": ref["seconds"] / runs["original"]["decode"][split]["tasc_spec"]["seconds"],
            "tasc_spec_speedup_on_tasc_ft": ft["seconds"] / ft_spec["seconds"],
            "combined_speedup": ref["seconds"] / ft_spec["seconds"],
        }
    first = next(iter(comparisons))
    reduction = compression[first]["reduction_enriched"]
    speed = comparisons[first]["enriched+plain"]["speedup"]
    targets = {
        "reference_output_token_reduction>=25%_with<=500_new_tokens": {
            "value": reduction,
            "met": reduction >= 0.25 and compression["new_tokens"] <= 500,
        }
    }
    targets["decode_speedup>=1.3x"] = {"value": speed, "met": speed >= 1.3}
    for split in comparisons:
        for k in keys:
            delta = comparisons[split]["enriched+plain"].get(f"{k}_delta")
            if delta is not None:
                targets[f"{k}_within_2_points ({split})"] = {"value": delta, "met": delta >= -2.0}
        gain = comparisons[split]["composition"]["tasc_spec_speedup_on_tasc_ft"]
        targets[f"tasc_ft+tasc_spec>={COMPOSITION_TARGET}x_tasc_ft_alone ({split})"] = {
            "value": gain,
            "met": gain >= COMPOSITION_TARGET,
        }
    result["comparisons"], result["targets"] = comparisons, targets
    return result


def title(r: dict[str, Any]) -> str:
    task = r.get("task") or r["direction"]
    where = f"E2E {task}" if task in DIRECTIONS else task
    return f"TASC-ft on {where} ({r['model']}, {r['device']})"


def _compression_table(r: dict[str, Any]) -> list[str]:
    c = r["compression"]
    lines = [
        "## Compression (references re-tokenised)",
        "",
        "| split | vocabulary | new tokens | tokens / output | reduction |",
        "|---|---|---|---|---|",
    ]
    for split in r["runs"]["original"]["decode"]:
        cs = c[split]
        lines += [
            f"| {split} | original | 0 | {cs['tokens_per_output_original']:.2f} | - |",
            f"| {split} | TASC-ft (prefix-conflict filter on) | {c['new_tokens']} | "
            f"{cs['tokens_per_output_enriched']:.2f} | {100 * cs['reduction_enriched']:.1f}% |",
            f"| {split} | TASC-ft (filter off) | {c['new_tokens_no_prefix_filter']} | "
            f"{cs['tokens_per_output_enriched_no_prefix_filter']:.2f} | "
            f"{100 * cs['reduction_enriched_no_prefix_filter']:.1f}% |",
        ]
    return lines


def _training_table(r: dict[str, Any]) -> list[str]:
    lines = [
        "## Fine-tuning (same recipe for both)",
        "",
        "| model | recipe | steps | final loss | train s |",
        "|---|---|---|---|---|",
    ]
    for name, run_ in r["runs"].items():
        t = run_["train"]
        label = f"{name} (trained in {t['reused_from']})" if t.get("reused_from") else name
        lines.append(f"| {label} | {t['recipe']} | {t['steps']} | {t['final_loss']:.3f} | {t['train_seconds']:.0f} |")
    distilled = r["runs"]["enriched"]["train"].get("distilled")
    if distilled:
        lines += [
            "",
            "The enriched model trained on the fine-tuned original model's greedy outputs for the training prompts "
            f"(`--distill`): {100 * distilled['equal_to_reference']:.1f}% of them equal their reference, "
            f"{distilled['hit_length_limit']} hit the length limit, {distilled['kept_reference']} were empty "
            f"(the reference kept); decoded in {distilled['seconds']:.0f} s.",
        ]
    return lines


def _decoding_table(r: dict[str, Any]) -> list[str]:
    keys = [k for k in result_metrics(r)]
    lines = [
        "## Decoding",
        "",
        "| split | model | decoding | s | speedup | tokens / output | new-token share | tokens / pass | "
        + " | ".join(keys)
        + " |",
        "|---|---|---|---|---|---|---|---|" + "---|" * len(keys),
    ]
    for split in r["runs"]["original"]["decode"]:
        for name, run_ in r["runs"].items():
            for mode, d in run_["decode"][split].items():
                cmp = r["comparisons"][split][f"{name}+{mode}"]
                quality = " | ".join(f"{d[k]:.1f}" if k in d else "-" for k in keys)
                lines.append(
                    f"| {split} | {name} | {mode} | {d['seconds']:.1f} | {cmp['speedup']:.2f}x | "
                    f"{d['tokens_per_output']:.1f} | {100 * d['new_token_share']:.1f}% | "
                    f"{d['tokens_per_pass']:.2f} | {quality} |"
                )
    return lines


def _interval_table(r: dict[str, Any]) -> list[str]:
    lines = [
        "## Quality: the TASC-ft model minus the original-vocabulary model (both decoded plainly)",
        "",
        "With the 95% paired-bootstrap interval over the evaluation prompts: how far the difference could move on "
        "another draw of prompts of this size. Run-to-run noise of the fine-tuning is not in it "
        "(`--train-seed` measures that).",
        "",
        "| split | metric | difference (points) | 95% interval |",
        "|---|---|---|---|",
    ]
    for split, intervals in r["quality_intervals"].items():
        for k, (lo, hi) in intervals.items():
            delta = r["comparisons"][split]["enriched+plain"][f"{k}_delta"]
            lines.append(f"| {split} | {k} | {delta:+.1f} | [{lo:+.1f}, {hi:+.1f}] |")
    return lines


def _composition_table(r: dict[str, Any]) -> list[str]:
    lines = [
        "## TASC-ft with TASC-spec (speedups from the decoding wall times above)",
        "",
        "| split | TASC-spec on the original model | TASC-ft alone | TASC-spec on the TASC-ft model | "
        "TASC-ft + TASC-spec vs original plain |",
        "|---|---|---|---|---|",
    ]
    for split, c in r["comparisons"].items():
        comp = c["composition"]
        lines.append(
            f"| {split} | {comp['tasc_spec_speedup']:.2f}x | {comp['tasc_ft_speedup']:.2f}x | "
            f"{comp['tasc_spec_speedup_on_tasc_ft']:.2f}x | **{comp['combined_speedup']:.2f}x** |"
        )
    return lines


def markdown(r: dict[str, Any]) -> str:
    """The result's tables (the common writer adds the command, title and machine above them)."""
    rows = ", ".join(f"{n} `{k}`" for k, n in r["eval_rows"].items())
    if "task_description" in r:
        intro = (
            f"{r['train_rows']} training rows; evaluation prompts: {rows}. {r['task_description']}. "
            f"Decoding batch size {r['config']['gen_batch_size']}. Total wall time {r['total_seconds'] / 60:.1f} min."
        )
    else:  # a result written before the generic path renders as it was written
        intro = (
            f"{r['train_rows']} training rows (E2E devset, MRs not held out); evaluation prompts: {rows}. "
            "`heldout`: devset rows whose MR no training row has (the task's distribution); `test`: the E2E test set "
            "(names and food values the devset lacks; eatType mostly pub/restaurant, which the devset never has). "
            f"Total wall time {r['total_seconds'] / 60:.1f} min."
        )
    composition = all("composition" in c for c in r["comparisons"].values())
    lines = [
        intro,
        "",
        *_compression_table(r),
        "",
        *_training_table(r),
        "",
        *_decoding_table(r),
        "",
        *([*_interval_table(r), ""] if r.get("quality_intervals") else []),
        *([*_composition_table(r), ""] if composition else []),
        f"## Targets (compression and speed on `{next(iter(r['comparisons']))}`)",
        "",
        "| target | value | met |",
        "|---|---|---|",
    ]
    for name, t in r["targets"].items():
        lines.append(f"| {name} | {t['value']:.3f} | {'yes' if t['met'] else 'NO'} |")
    for note in r.get("notes", []):
        lines += ["", f"Note: {note}"]
    lines += ["", "First added tokens: " + ", ".join(f"`{t}`" for t in r["added_tokens_head"][:20]), ""]
    return "\n".join(lines)
