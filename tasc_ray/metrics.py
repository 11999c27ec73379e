"""Task quality metrics of outputs against one reference each: exact match, slot F1 on `key[value]` meaning
representations (E2E's `name[The Eagle], eatType[pub]`), and corpus BLEU / chrF (sacrebleu).

    score("slot_f1", preds, refs)      # 0-100, the metric `tasc-ray ft-pipeline --metric` compares models with

Corpus BLEU and chrF are also given as per-output statistics that sum to the corpus score's (`text_segment_stats`,
`corpus_text_score`), which is what a paired bootstrap over the outputs resamples (the benchmarks do)."""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

SLOT = re.compile(r"([^,\[\]]+)\[([^\]]*)\]")  # `attribute[value]`, comma-separated
METRICS = ("exact_match", "slot_f1", "bleu")  # what `score` computes


def parse_slots(mr: str) -> set[tuple[str, str]]:
    """The (attribute, value) pairs of an MR such as `name[The Eagle], eatType[pub]`, stripped."""
    return {(k.strip(), v.strip()) for k, v in SLOT.findall(mr)}


def slot_counts(preds: Sequence[str], refs: Sequence[str]) -> tuple[int, int, int, int]:
    """(true positives, predicted slots, reference slots, outputs with exactly the reference's non-empty slot set)."""
    tp = n_pred = n_ref = exact = 0
    for p, r in zip(preds, refs):
        ps, rs = parse_slots(p), parse_slots(r)
        tp, n_pred, n_ref = tp + len(ps & rs), n_pred + len(ps), n_ref + len(rs)
        exact += int(ps == rs and bool(rs))
    return tp, n_pred, n_ref, exact


def micro_f1(tp: int, n_pred: int, n_ref: int) -> float:
    """F1 from pooled counts, in [0, 1]: 2 TP / (predicted + reference), 0 when neither side has any."""
    return 2 * tp / (n_pred + n_ref) if n_pred + n_ref else 0.0


def slot_f1(preds: Sequence[str], refs: Sequence[str]) -> float:
    """Micro F1 over (attribute, value) pairs, in [0, 1] (0 when neither side has a slot)."""
    tp, n_pred, n_ref, _ = slot_counts(preds, refs)
    return micro_f1(tp, n_pred, n_ref)


def exact_match(preds: Sequence[str], refs: Sequence[str]) -> float:
    """Share of outputs equal to their reference once both are stripped, in [0, 1]."""
    return sum(p.strip() == r.strip() for p, r in zip(preds, refs)) / max(1, len(refs))


def _sacrebleu(name: str) -> object:
    from sacrebleu.metrics import BLEU, CHRF

    return {"bleu": BLEU, "chrf": CHRF}[name]()  # the defaults of sacrebleu.corpus_bleu / corpus_chrf


def text_segment_stats(name: str, preds: Sequence[str], refs: Sequence[Sequence[str]]) -> np.ndarray:
    """sacrebleu's per-output match counts for `bleu` or `chrf` (one row per output), against each output's
    references (any number per output: a missing one in a reference stream repeats that output's first one)."""
    width = max(len(r) for r in refs)
    streams = [[r[i] if i < len(r) else r[0] for r in refs] for i in range(width)]
    stats = _sacrebleu(name)._extract_corpus_statistics(list(preds), streams)  # type: ignore[attr-defined]
    return np.asarray(stats, dtype=np.int64).reshape(len(preds), -1)


def corpus_text_score(name: str, total: np.ndarray) -> float:
    """The corpus score (0-100) from summed per-output statistics (what sacrebleu's corpus score computes)."""
    return float(_sacrebleu(name)._compute_score_from_stats(list(total)).score)  # type: ignore[attr-defined]


def text_scores(preds: Sequence[str], refs: Sequence[Sequence[str]]) -> dict[str, float]:
    """Corpus BLEU and chrF (sacrebleu, 0-100) against each output's references."""
    return {m: corpus_text_score(m, text_segment_stats(m, preds, refs).sum(0)) for m in ("bleu", "chrf")}


def score(metric: str, preds: Sequence[str], refs: Sequence[str]) -> float:
    """`metric` (one of METRICS) of the outputs against one reference each, in points (0-100)."""
    if metric == "exact_match":
        return 100 * exact_match(preds, refs)
    if metric == "slot_f1":
        return 100 * slot_f1(preds, refs)
    if metric == "bleu":
        return corpus_text_score("bleu", text_segment_stats("bleu", preds, [[r] for r in refs]).sum(0))
    raise ValueError(f"unknown metric {metric!r}; choose one of {', '.join(METRICS)}")
