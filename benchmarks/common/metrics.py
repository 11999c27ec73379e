"""Task quality metrics of the benchmarks: slot F1 and exact match on E2E meaning representations (MRs), exact
string match, corpus BLEU and chrF (sacrebleu), and the share of outputs identical between two decodings."""

from __future__ import annotations

import re
from collections.abc import Sequence

SLOT = re.compile(r"([^,\[\]]+)\[([^\]]*)\]")  # `attribute[value]`, comma-separated


def parse_slots(mr: str) -> set[tuple[str, str]]:
    """The (attribute, value) pairs of an MR such as `name[The Eagle], eatType[pub]`, stripped."""
    return {(k.strip(), v.strip()) for k, v in SLOT.findall(mr)}


def _slot_counts(preds: Sequence[str], refs: Sequence[str]) -> tuple[int, int, int, int]:
    """(true positives, predicted slots, reference slots, outputs with exactly the reference's non-empty slot set)."""
    tp = n_pred = n_ref = exact = 0
    for p, r in zip(preds, refs):
        ps, rs = parse_slots(p), parse_slots(r)
        tp, n_pred, n_ref = tp + len(ps & rs), n_pred + len(ps), n_ref + len(rs)
        exact += int(ps == rs and bool(rs))
    return tp, n_pred, n_ref, exact


def slot_f1(preds: Sequence[str], refs: Sequence[str]) -> float:
    """Micro F1 over (attribute, value) pairs, in [0, 1] (0 when neither side has a slot)."""
    tp, n_pred, n_ref, _ = _slot_counts(preds, refs)
    return 2 * tp / (n_pred + n_ref) if n_pred + n_ref else 0.0


def slot_scores(preds: Sequence[str], refs: Sequence[str]) -> dict[str, float]:
    """Exact match (the same slot set) and micro slot F1, in percent."""
    tp, n_pred, n_ref, exact = _slot_counts(preds, refs)
    f1 = 2 * tp / (n_pred + n_ref) if n_pred + n_ref else 0.0
    return {"exact_match": 100 * exact / max(1, len(refs)), "slot_f1": 100 * f1}


def exact_match(preds: Sequence[str], refs: Sequence[str]) -> float:
    """Share of outputs equal to their reference once both are stripped, in [0, 1]."""
    return sum(p.strip() == r.strip() for p, r in zip(preds, refs)) / max(1, len(refs))


def share_identical(a: Sequence[object], b: Sequence[object]) -> float:
    """Share of positions where two decodings of the same prompts agree (texts or token id lists), in [0, 1]."""
    return sum(x == y for x, y in zip(a, b)) / max(1, len(a))


def text_scores(preds: Sequence[str], refs: Sequence[Sequence[str]]) -> dict[str, float]:
    """Corpus BLEU and chrF (sacrebleu, 0-100) against each output's references (any number per output: a missing
    one in a reference stream repeats that output's first reference)."""
    import sacrebleu

    width = max(len(r) for r in refs)
    streams = [[r[i] if i < len(r) else r[0] for r in refs] for i in range(width)]
    return {"bleu": sacrebleu.corpus_bleu(preds, streams).score, "chrf": sacrebleu.corpus_chrf(preds, streams).score}
