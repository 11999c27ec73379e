"""`python -m benchmarks ft-nll --original DIR --enriched DIR`: where a TASC-ft model loses likelihood (no decoding).

Both fine-tuned models of a `bench ft` run (its work dir's `ft_original` and `ft_enriched`) score the references of
every evaluation split with teacher forcing: the prompt, then the reference as each model's tokenizer tokenises it,
then EOS. For each reference the enriched model's tokens are aligned to the original model's by character offsets,
so every span of text gets two costs in nats: the enriched model's for its token, the original model's summed over
the original tokens starting inside it. The spans are grouped by kind: a new token, an original token right after a
new token (how well the model reads a new token back), any other original token, and EOS.

The total per reference is a quality measure that does not depend on search; the groups tell whether the loss is in
emitting the new tokens or in the rest of the model. Greedy decoding can only follow one tokenisation, so these
canonical-tokenisation costs are what it sees (an upper bound on the string's likelihood under the enriched model).
"""

from __future__ import annotations

import argparse
import bisect
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from benchmarks.common.report import provenance, write_report

KINDS = ("new", "after_new", "other", "eos")


def register(subparsers: argparse._SubParsersAction, add_task_arguments: Any) -> None:
    p = subparsers.add_parser(
        "ft-nll",
        help="teacher-forced likelihood of the references under a bench ft run's two models, by token kind",
        description=__doc__,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_task_arguments(p)
    p.add_argument("--original", required=True, help="the fine-tuned original-vocabulary model (ft_original)")
    p.add_argument("--enriched", required=True, help="the fine-tuned TASC-ft model (ft_enriched)")
    p.add_argument("--refs-per-prompt", type=int, default=3, help="references scored per evaluation prompt")
    p.add_argument("--tag", default="cpu")
    p.add_argument("--out-dir", default="benchmarks/results")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=run)


def span_costs(model: Any, tokenizer: Any, prompt: str, reference: str) -> list[tuple[int, int, int, float]]:
    """(start, end, token id, nats) for each token of the reference and a last (n, n, -1, nats) for EOS."""
    p = tokenizer(prompt)["input_ids"]
    enc = tokenizer(reference, add_special_tokens=False, return_offsets_mapping=True)
    out = enc["input_ids"] + [tokenizer.eos_token_id]
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([p + out])).logits[0, len(p) - 1 : -1].float(), dim=-1)
    nats = (-logp[torch.arange(len(out)), torch.tensor(out)]).tolist()
    spans = [(s, e, t, n) for (s, e), t, n in zip(enc["offset_mapping"], enc["input_ids"], nats)]
    return spans + [(len(reference), len(reference), -1, nats[-1])]


def _add(into: list[float], values: Sequence[float]) -> None:
    """[count, enriched nats, original nats] += values, in place."""
    for i, v in enumerate(values):
        into[i] += v


def compare(
    original: list[tuple[int, int, int, float]], enriched: list[tuple[int, int, int, float]], base_vocab: int
) -> dict[str, list[float]]:
    """{kind: [count, enriched nats, original nats]} for one reference. Each original token counts once, with the
    last enriched token starting at or before it (byte-level pieces of one character share their offsets)."""
    starts = [s for s, _, t, _ in enriched if t != -1]
    theirs = [0.0] * len(enriched)
    for s, _, t, nats in original:
        theirs[len(enriched) - 1 if t == -1 else max(0, bisect.bisect_right(starts, s) - 1)] += nats
    totals = {k: [0.0, 0.0, 0.0] for k in KINDS}
    previous = -1
    for i, (_, _, token, nats) in enumerate(enriched):
        if token == -1:
            kind = "eos"
        else:
            kind = "new" if token >= base_vocab else ("after_new" if previous >= base_vocab else "other")
        _add(totals[kind], (1, nats, theirs[i]))
        previous = token
    return totals


def run(args: argparse.Namespace) -> dict[str, Any]:
    from benchmarks.ft import load_task
    from tasc_ray.models import load_model

    header = provenance("ft-nll")
    task = load_task(args)
    models = {name: load_model(path, dtype="float32", device="cpu") for name, path in (
        ("original", args.original), ("enriched", args.enriched))}  # fmt: skip
    for model, _ in models.values():
        model.eval()
    base_vocab = len(models["original"][1])
    splits: dict[str, Any] = {}
    for split, held in task.splits.items():
        pairs = [(h["prompt"], ref) for h in held for ref in h["refs"][: args.refs_per_prompt]]
        totals = {k: [0.0, 0.0, 0.0] for k in KINDS}
        for prompt, ref in pairs:
            costs = {name: span_costs(m, tok, prompt, ref) for name, (m, tok) in models.items()}
            for kind, part in compare(costs["original"], costs["enriched"], base_vocab).items():
                _add(totals[kind], part)
        per_ref = {
            kind: {"tokens": n / len(pairs), "enriched_nats": ours / len(pairs), "original_nats": theirs / len(pairs)}
            for kind, (n, ours, theirs) in totals.items()
        }
        splits[split] = {
            "references": len(pairs),
            "by_kind": per_ref,
            "enriched_nats": sum(v["enriched_nats"] for v in per_ref.values()),
            "original_nats": sum(v["original_nats"] for v in per_ref.values()),
        }
    report = {
        "benchmark": "ft-nll",
        "task": task.name,
        **header,
        "original": args.original,
        "enriched": args.enriched,
        "splits": splits,
    }
    stem = Path(args.out_dir) / f"ft_nll_{task.name}_{args.tag}"
    write_report(report, stem.with_suffix(".json"), f"Where TASC-ft loses likelihood on {task.name}", markdown(report))
    return report


def markdown(r: dict[str, Any]) -> str:
    lines = [
        f"Original-vocabulary model `{r['original']}`, TASC-ft model `{r['enriched']}`. Nats per reference "
        "(teacher forcing, canonical tokenisation); the original model's cost of the same text span beside it.",
        "",
        "| split | references | span kind | TASC-ft tokens / reference | TASC-ft nats | original nats, same text | "
        "excess |",
        "|---|---|---|---|---|---|---|",
    ]
    for split, s in r["splits"].items():
        for kind, v in s["by_kind"].items():
            lines.append(
                f"| {split} | {s['references']} | {kind} | {v['tokens']:.1f} | {v['enriched_nats']:.2f} | "
                f"{v['original_nats']:.2f} | {v['enriched_nats'] - v['original_nats']:+.2f} |"
            )
        lines.append(
            f"| {split} | {s['references']} | **all** | | **{s['enriched_nats']:.2f}** | **{s['original_nats']:.2f}** "
            f"| **{s['enriched_nats'] - s['original_nats']:+.2f}** |"
        )
    return "\n".join(lines) + "\n"
