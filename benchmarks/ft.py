"""`tasc-ray bench ft`: TASC-ft on E2E, the original vocabulary against the enriched one under the same recipe.

For one direction (text -> MR, or MR -> text) the harness:

1. splits the E2E devset by meaning representation (MR): a fifth of its MRs are held out; draws `--train-rows`
   training rows from the rest, and `--eval-rows` prompts for each of two evaluation splits, with short plain
   completion prompts (no few-shot: the models are fine-tuned):
   * `heldout`: devset rows whose MR no training row has (the task's own distribution, unseen outputs);
   * `test`: the E2E test set, a shifted distribution: half its restaurant names and most food values are not
     in the devset, whose only eatType value is "coffee shop" while most test MRs say "pub" or "restaurant";
2. enriches the vocabulary on the training outputs (with and, for the record, without the prefix-conflict
   filter) and measures tokens per output on each split's references by re-tokenising them;
3. fine-tunes the original model and the enriched one on Ray Train with the same recipe, steps and data;
4. decodes both splits' prompts with each fine-tuned model, plainly and with TASC-spec (an n-gram index built
   from the training outputs with that model's own tokenizer), and reports wall time, speedup over the
   fine-tuned original-vocabulary model, tokens per generated output, the share of generated tokens that are
   new tokens, and task quality (exact match and slot F1 for text -> MR; BLEU and chrF for MR -> text);
5. writes `<out-dir>/ft_<direction>_<tag>.json` and `.md` (with the exact command).
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import random
import re
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import pandas as pd
import torch

logger = logging.getLogger(__name__)

E2E_DIR = Path(__file__).resolve().parents[3] / "shared" / "datasets" / "e2e"
DIRECTIONS = ("text2mr", "mr2text")
SLOT = re.compile(r"([^,\[\]]+)\[([^\]]*)\]")
SPLITS = ("heldout", "test")  # the target split first


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "ft",
        help="TASC-ft on E2E: original vs enriched vocabulary, fine-tuned alike",
        description=__doc__,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--direction", choices=DIRECTIONS, default="text2mr")
    p.add_argument("--data-dir", default=str(E2E_DIR), help="folder with devset.csv and testset_w_refs.csv")
    p.add_argument("--train-rows", type=int, default=256)
    p.add_argument("--eval-rows", type=int, default=48, help="prompts per evaluation split")
    p.add_argument("--holdout-fraction", type=float, default=0.2, help="share of devset MRs held out")
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
        default=1.0,
        help="learning-rate multiplier for the new tokens' embedding rows (LoRA and full)",
    )
    p.add_argument("--min-count", type=int, default=2, help="least occurrences of a new token's n-gram")
    p.add_argument("--full", action="store_true", help="full fine-tuning instead of LoRA")
    p.add_argument(
        "--no-cross",
        action="append",
        default=[],
        metavar="SEP",
        help="a field separator new tokens may not span (repeatable)",
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
    p.add_argument("--seed", type=int, default=0)
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
    p.set_defaults(handler=run)


# ----- data -----
def _prompt(direction: str, source: str) -> str:
    return f"Sentence: {source}\nMR:\n" if direction == "text2mr" else f"MR: {source}\nSentence:\n"


def _eval_rows(df: pd.DataFrame, direction: str, n: int, rng: random.Random) -> list[dict[str, Any]]:
    """`n` prompts with their references: one row per prompt for text -> MR; one MR with all its sentences for
    MR -> text."""
    if direction == "text2mr":
        idx = rng.sample(range(len(df)), min(n, len(df)))
        return [{"prompt": _prompt(direction, df.ref.iloc[i]), "refs": [df.mr.iloc[i]]} for i in idx]
    groups = df.groupby("mr", sort=True)["ref"].apply(list)
    mrs = rng.sample(list(groups.index), min(n, len(groups)))
    return [{"prompt": _prompt(direction, mr), "refs": groups[mr]} for mr in mrs]


def load_e2e(
    data_dir: str | Path, direction: str, n_train: int, n_eval: int, seed: int, holdout_fraction: float = 0.2
) -> tuple[list[dict[str, str]], dict[str, list[dict[str, Any]]]]:
    """Training rows from the devset MRs not held out; evaluation splits `heldout` (devset rows of the held-out
    MRs) and `test` (testset_w_refs.csv)."""
    data_dir = Path(data_dir)
    dev = pd.read_csv(data_dir / "devset.csv")
    test = pd.read_csv(data_dir / "testset_w_refs.csv")
    rng = random.Random(seed)
    mrs = sorted(set(dev.mr))
    rng.shuffle(mrs)
    held_mrs = set(mrs[: max(1, round(holdout_fraction * len(mrs)))])
    train_df, held_df = dev[~dev.mr.isin(held_mrs)], dev[dev.mr.isin(held_mrs)]
    source, target = ("ref", "mr") if direction == "text2mr" else ("mr", "ref")
    idx = rng.sample(range(len(train_df)), min(n_train, len(train_df)))
    train = [{"prompt": _prompt(direction, train_df[source].iloc[i]), "output": train_df[target].iloc[i]} for i in idx]
    splits = {"heldout": _eval_rows(held_df, direction, n_eval, rng), "test": _eval_rows(test, direction, n_eval, rng)}
    return train, splits


# ----- quality -----
def parse_slots(mr: str) -> set[tuple[str, str]]:
    return {(k.strip(), v.strip()) for k, v in SLOT.findall(mr)}


def slot_scores(preds: list[str], refs: list[str]) -> dict[str, float]:
    """Exact match (same slot set) and micro slot F1, in percent."""
    tp = n_pred = n_ref = exact = 0
    for p, r in zip(preds, refs):
        ps, rs = parse_slots(p), parse_slots(r)
        tp, n_pred, n_ref = tp + len(ps & rs), n_pred + len(ps), n_ref + len(rs)
        exact += int(ps == rs and bool(rs))
    prec, rec = tp / max(1, n_pred), tp / max(1, n_ref)
    f1 = 2 * prec * rec / (prec + rec) if prec + rec else 0.0
    return {"exact_match": 100 * exact / max(1, len(refs)), "slot_f1": 100 * f1}


def text_scores(preds: list[str], refs: list[list[str]]) -> dict[str, float]:
    import sacrebleu

    width = max(len(r) for r in refs)
    streams = [[r[i] if i < len(r) else r[0] for r in refs] for i in range(width)]
    return {"bleu": sacrebleu.corpus_bleu(preds, streams).score, "chrf": sacrebleu.corpus_chrf(preds, streams).score}


# ----- decoding -----
def evaluate(
    model_dir: str,
    splits: dict[str, list[dict[str, Any]]],
    train_outputs: list[str],
    direction: str,
    args: argparse.Namespace,
    base_vocab: int,
) -> dict[str, dict[str, Any]]:
    """Decode each split's prompts plainly and with TASC-spec; time, tokens, new-token share, quality."""
    from tasc_ray.models import load_model
    from tasc_ray.spec.index import NgramIndex

    dtype = "bfloat16" if args.bf16 else "float32"
    model, tokenizer = load_model(model_dir, dtype=dtype, device=args.device)
    index = NgramIndex.from_texts(train_outputs, tokenizer)
    results = {
        split: _decode_split(model, tokenizer, index, held, direction, args, base_vocab)
        for split, held in splits.items()
    }
    del model
    return results


def _decode_split(
    model: Any,
    tokenizer: Any,
    index: Any,
    held: list[dict[str, Any]],
    direction: str,
    args: argparse.Namespace,
    base_vocab: int,
) -> dict[str, Any]:
    from tasc_ray.spec.config import DrafterConfig
    from tasc_ray.spec.drafter import Drafter
    from tasc_ray.spec.generator import SamplingParams, SpeculativeGenerator

    prompts = [h["prompt"] for h in held]
    results: dict[str, Any] = {}
    for mode in ("plain", "tasc_spec"):
        gen = SpeculativeGenerator(
            model,
            tokenizer,
            Drafter(index, DrafterConfig()) if mode == "tasc_spec" else None,
            max_batch_size=args.gen_batch_size,
        )
        params = SamplingParams(max_new_tokens=args.max_new_tokens, stop=["\n"], speculative=mode == "tasc_spec")
        gen.generate(prompts[:2], params)  # warm-up
        if torch.cuda.is_available() and str(model.device).startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = gen.generate(prompts, params)
        if torch.cuda.is_available() and str(model.device).startswith("cuda"):
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        texts = [r.text.strip() for r in out]
        n_tokens = sum(r.new_tokens for r in out)
        n_new = sum(1 for r in out for t in r.token_ids if t >= base_vocab)
        passes = sum(r.stats.forward_passes for r in out)
        entry = {
            "seconds": seconds,
            "tokens": n_tokens,
            "tokens_per_output": n_tokens / len(out),
            "tokens_per_s": n_tokens / seconds,
            "new_token_share": n_new / max(1, n_tokens),
            "forward_passes": passes,
            "tokens_per_pass": n_tokens / max(1, passes),
            "finish_length": sum(r.finish_reason == "length" for r in out),
            "samples": texts[:3],
        }
        if direction == "text2mr":
            entry.update(slot_scores(texts, [h["refs"][0] for h in held]))
        else:
            entry.update(text_scores(texts, [h["refs"] for h in held]))
        results[mode] = entry
        results.setdefault("_texts", {})[mode] = texts
    plain, spec = results["_texts"]["plain"], results["_texts"]["tasc_spec"]
    results["tasc_spec"]["matches_plain"] = sum(a == b for a, b in zip(plain, spec)) / len(plain)
    del results["_texts"]
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
    summary_file = _original_summary_file(work)
    if pd.read_parquet(work / "train.parquet").to_dict("records") != train:
        raise ValueError(f"--reuse-original {work}: its training rows differ from this run's")
    summary = json.loads(summary_file.read_text())
    differ = [k for k in RECIPE_KEYS if summary["config"].get(k) != getattr(cfg, k)]
    if differ:
        raise ValueError(f"--reuse-original {work}: its recipe differs in {', '.join(differ)}")
    logger.info("reusing the fine-tuned original-vocabulary model of %s", work)
    return summary | {"out": str(work / "ft_original"), "reused_from": str(work)}


def run(args: argparse.Namespace) -> dict[str, Any]:
    from transformers import AutoTokenizer

    from tasc_ray.ft.enrich import EnrichConfig, count_tokens, enrich_model, enrich_tokenizer
    from tasc_ray.ft.train import FinetuneConfig, finetune
    from tasc_ray.models import resolve_model

    reuse = getattr(args, "reuse_original", None)
    if reuse:
        _original_summary_file(Path(reuse))  # refuse a missing model before any work
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda was given but CUDA is not available")
    if Path(sys.argv[0]).name == "ft.py":  # python -m benchmarks.ft
        command = "python -m benchmarks.ft " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    else:
        command = "tasc-ray " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:] else "tasc-ray bench ft"
    t_start = time.perf_counter()
    work = Path(args.work_dir) / f"{args.direction}_{args.tag}_{int(time.time())}"
    work.mkdir(parents=True, exist_ok=True)
    train, splits = load_e2e(
        args.data_dir,
        args.direction,
        args.train_rows,
        args.eval_rows,
        args.seed,
        getattr(args, "holdout_fraction", 0.2),
    )
    pd.DataFrame(train).to_parquet(work / "train.parquet")
    train_outputs = [r["output"] for r in train]
    base_path = resolve_model(args.model)
    base_tok = AutoTokenizer.from_pretrained(base_path)
    base_vocab = len(base_tok)

    # 1. vocabulary: with the filter (the model we fine-tune) and without it (compression only)
    enrich_cfg = dict(
        budget=args.budget,
        max_n=args.max_n,
        per_iteration=args.per_iteration,
        holdout=0.0,
        seed=args.seed,
        min_count=getattr(args, "min_count", 2),
        no_cross=tuple(getattr(args, "no_cross", ())),
    )
    report = enrich_model(args.model, train_outputs, work / "enriched", EnrichConfig(**enrich_cfg))
    enriched_tok = AutoTokenizer.from_pretrained(work / "enriched")
    nofilter = enrich_tokenizer(
        base_tok, train_outputs, EnrichConfig(prefix_filter=False, **enrich_cfg), progress=False
    )
    compression: dict[str, Any] = {
        "new_tokens": report["n_new_tokens"],
        "new_tokens_no_prefix_filter": len(nofilter.new_tokens),
        "iterations": len(report["iterations"]),
        "stop_reason": report["stop_reason"],
        "enrich_seconds": report["seconds"],
    }
    for split, held in splits.items():
        refs = [r for h in held for r in h["refs"]]
        c = {"references": len(refs)}
        for key, tok in (
            ("original", base_tok),
            ("enriched", enriched_tok),
            ("enriched_no_prefix_filter", nofilter.tokenizer),
        ):
            c[f"tokens_per_output_{key}"] = count_tokens(tok, refs) / len(refs)
        for key in ("enriched", "enriched_no_prefix_filter"):
            c[f"reduction_{key}"] = 1 - c[f"tokens_per_output_{key}"] / c["tokens_per_output_original"]
        compression[split] = c
    logger.info("compression on the evaluation splits' references: %s", compression)

    # 2. fine-tune both with the same recipe
    runs: dict[str, Any] = {}
    for name, model in (("original", args.model), ("enriched", str(work / "enriched"))):
        cfg = FinetuneConfig(
            model=model,
            train=str(work / "train.parquet"),
            out=str(work / f"ft_{name}"),
            epochs=args.epochs,
            lr=args.lr,
            lora_r=args.lora_r,
            full=args.full,
            new_token_lr_mult=getattr(args, "new_token_lr_mult", 1.0),
            num_workers=args.num_workers,
            use_gpu=args.use_gpu,
            bf16=args.bf16,
            max_steps=args.max_steps,
            batch_size=args.batch_size,
            seed=args.seed,
            storage_path=str((work / "ray").resolve()),
            name=f"ft-{name}",
            trainer=args.trainer,
            progress=True,
        )
        reusing = reuse and name == "original"
        summary = reused_original(Path(reuse), cfg, train) if reusing else finetune(cfg)
        cfg.out = summary["out"]
        runs[name] = {
            "train": {
                k: summary[k]
                for k in (
                    "recipe",
                    "rows",
                    "epochs_done",
                    "steps",
                    "final_loss",
                    "train_seconds",
                    "backend",
                    "num_workers",
                    "trainer",
                )
            }
        }
        if "reused_from" in summary:
            runs[name]["train"]["reused_from"] = summary["reused_from"]
        runs[name]["decode"] = evaluate(cfg.out, splits, train_outputs, args.direction, args, base_vocab)
        logger.info("%s: %s", name, json.dumps(runs[name], default=str)[:2000])

    result = {
        "benchmark": "ft",
        "direction": args.direction,
        "command": command,
        "model": args.model,
        "device": args.device,
        "host": platform.node(),
        "torch_threads": torch.get_num_threads(),
        "train_rows": len(train),
        "eval_rows": {k: len(v) for k, v in splits.items()},
        "config": vars(args) | {"handler": None},
        "compression": compression,
        "runs": runs,
        "added_tokens_head": [t["token"] for t in report["new_tokens"][:40]],
        "total_seconds": time.perf_counter() - t_start,
        "work_dir": str(work),
    }
    finalize(result)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"ft_{args.direction}_{args.tag}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2, default=str, ensure_ascii=False))
    stem.with_suffix(".md").write_text(markdown(result))
    logger.info("wrote %s.json and .md", stem)
    return result


QUALITY = {"text2mr": ("exact_match", "slot_f1"), "mr2text": ("bleu", "chrf")}


def finalize(result: dict[str, Any]) -> dict[str, Any]:
    """Derive, per evaluation split, the comparisons against the fine-tuned original-vocabulary model decoded
    plainly, and the target checks (compression and speed on `heldout`; quality on every split)."""
    keys = QUALITY[result["direction"]]
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
                    **{f"{k}_delta": d[k] - ref[k] for k in keys},
                }
    reduction = compression[SPLITS[0]]["reduction_enriched"]
    speed = comparisons[SPLITS[0]]["enriched+plain"]["speedup"]
    targets = {
        "reference_output_token_reduction>=25%_with<=500_new_tokens": {
            "value": reduction,
            "met": reduction >= 0.25 and compression["new_tokens"] <= 500,
        }
    }
    targets["decode_speedup>=1.3x"] = {"value": speed, "met": speed >= 1.3}
    for split in comparisons:
        for k in keys:
            delta = comparisons[split]["enriched+plain"][f"{k}_delta"]
            targets[f"{k}_within_2_points ({split})"] = {"value": delta, "met": delta >= -2.0}
    result["comparisons"], result["targets"] = comparisons, targets
    return result


def markdown(r: dict[str, Any]) -> str:
    c = r["compression"]
    q, q2 = QUALITY[r["direction"]]
    splits = list(r["runs"]["original"]["decode"])
    rows = ", ".join(f"{n} `{k}`" for k, n in r["eval_rows"].items())
    lines = [
        f"# TASC-ft on E2E {r['direction']} ({r['model']}, {r['device']})",
        "",
        "Command:",
        "",
        "```",
        r["command"],
        "```",
        "",
        f"{r['train_rows']} training rows (E2E devset, MRs not held out); evaluation prompts: {rows}. "
        "`heldout`: devset rows whose MR no training row has (the task's distribution); `test`: the E2E test set "
        "(names and food values the devset lacks; eatType mostly pub/restaurant, which the devset never has). "
        f"Total wall time {r['total_seconds'] / 60:.1f} min.",
        "",
        "## Compression (references re-tokenised)",
        "",
        "| split | vocabulary | new tokens | tokens / output | reduction |",
        "|---|---|---|---|---|",
    ]
    for split in splits:
        cs = c[split]
        lines += [
            f"| {split} | original | 0 | {cs['tokens_per_output_original']:.2f} | - |",
            f"| {split} | TASC-ft (prefix-conflict filter on) | {c['new_tokens']} | "
            f"{cs['tokens_per_output_enriched']:.2f} | {100 * cs['reduction_enriched']:.1f}% |",
            f"| {split} | TASC-ft (filter off) | {c['new_tokens_no_prefix_filter']} | "
            f"{cs['tokens_per_output_enriched_no_prefix_filter']:.2f} | "
            f"{100 * cs['reduction_enriched_no_prefix_filter']:.1f}% |",
        ]
    lines += [
        "",
        "## Fine-tuning (same recipe for both)",
        "",
        "| model | recipe | steps | final loss | train s |",
        "|---|---|---|---|---|",
    ]
    for name, run_ in r["runs"].items():
        t = run_["train"]
        label = f"{name} (trained in {t['reused_from']})" if t.get("reused_from") else name
        lines.append(f"| {label} | {t['recipe']} | {t['steps']} | {t['final_loss']:.3f} | {t['train_seconds']:.0f} |")
    lines += [
        "",
        "## Decoding",
        "",
        f"| split | model | decoding | s | speedup | tokens / output | new-token share | tokens / pass | {q} | {q2} |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for split in splits:
        for name, run_ in r["runs"].items():
            for mode, d in run_["decode"][split].items():
                cmp = r["comparisons"][split][f"{name}+{mode}"]
                lines.append(
                    f"| {split} | {name} | {mode} | {d['seconds']:.1f} | {cmp['speedup']:.2f}x | "
                    f"{d['tokens_per_output']:.1f} | {100 * d['new_token_share']:.1f}% | "
                    f"{d['tokens_per_pass']:.2f} | {d[q]:.1f} | {d[q2]:.1f} |"
                )
    lines += ["", "## Targets (compression and speed on `heldout`)", "", "| target | value | met |", "|---|---|---|"]
    for name, t in r["targets"].items():
        lines.append(f"| {name} | {t['value']:.3f} | {'yes' if t['met'] else 'NO'} |")
    for note in r.get("notes", []):
        lines += ["", f"Note: {note}"]
    lines += ["", "First added tokens: " + ", ".join(f"`{t}`" for t in r["added_tokens_head"][:20]), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """`python -m benchmarks.ft ...`: the same benchmark without the full CLI (for machines without Ray
    Serve/pydantic, with --trainer local)."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ft")
    register(parser.add_subparsers(dest="bench", required=True))
    args = parser.parse_args(["ft", *(sys.argv[1:] if argv is None else argv)])
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
