"""Task quality metrics of the benchmarks: slot F1 and exact match on E2E meaning representations (MRs), exact
string match, corpus BLEU and chrF (sacrebleu), the share of an MR's values a sentence states, and the share of
outputs identical between two decodings.

Corpus metrics are also given as per-output statistics that sum to the corpus score's (`text_segment_stats`,
`corpus_text_score`), which is what a paired bootstrap over the outputs resamples."""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

SLOT = re.compile(r"([^,\[\]]+)\[([^\]]*)\]")  # `attribute[value]`, comma-separated


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


def slot_scores(preds: Sequence[str], refs: Sequence[str]) -> dict[str, float]:
    """Exact match (the same slot set) and micro slot F1, in percent."""
    tp, n_pred, n_ref, exact = slot_counts(preds, refs)
    return {"exact_match": 100 * exact / max(1, len(refs)), "slot_f1": 100 * micro_f1(tp, n_pred, n_ref)}


def exact_match(preds: Sequence[str], refs: Sequence[str]) -> float:
    """Share of outputs equal to their reference once both are stripped, in [0, 1]."""
    return sum(p.strip() == r.strip() for p, r in zip(preds, refs)) / max(1, len(refs))


def task_quality(task: str, preds: Sequence[str], refs: Sequence[str]) -> tuple[str, float]:
    """The headline quality metric of a built-in task's outputs against one reference each, 0-100: slot F1 for
    E2E text -> MR, exact match for WikiSQL (and parquet tasks), chrF for E2E MR -> text."""
    if task == "e2e_text2mr":
        return "slot_f1", 100 * slot_f1(preds, refs)
    if task == "e2e_mr2text":
        return "chrf", text_scores(preds, [[r] for r in refs])["chrf"]
    return "exact_match", 100 * exact_match(preds, refs)


def share_identical(a: Sequence[object], b: Sequence[object]) -> float:
    """Share of positions where two decodings of the same prompts agree (texts or token id lists), in [0, 1]."""
    return sum(x == y for x, y in zip(a, b)) / max(1, len(a))


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


PROMPT_SLOT = re.compile(r"(\w[\w ]*)\[([^\]]*)\]")  # in a prompt: the attribute is the words right before `[`


def prompt_slots(prompt: str) -> list[tuple[str, str]]:
    """The (attribute, value) slots of the MR a prompt carries, stripped, in order."""
    return [(a.strip(), v.strip()) for a, v in PROMPT_SLOT.findall(prompt)]


# slot coverage: attributes whose values sentences paraphrase freely are not counted; a few E2E values have a
# common other wording
PARAPHRASED_ATTRIBUTES = frozenset({"familyFriendly", "customer rating", "priceRange"})
VALUE_WORDINGS = {
    "riverside": ("riverside", "river"),
    "city centre": ("city centre", "centre", "center", "city"),
    "english": ("english", "british"),
    "coffee shop": ("coffee",),
    "fast food": ("fast food", "fast-food"),
}


def stated_values(mr: str, text: str) -> tuple[int, int]:
    """(the values of `mr` that `text` states, the values counted): a value is stated when it (or a common other
    wording of it) occurs in the text, case-insensitively; familyFriendly, customer rating and priceRange are not
    counted. Human E2E references state 95% of these values (devset; 94% on the test set)."""
    lowered = text.lower()
    counted = [v.lower() for a, v in prompt_slots(mr) if a not in PARAPHRASED_ATTRIBUTES and v]
    stated = sum(any(w in lowered for w in VALUE_WORDINGS.get(v, (v,))) for v in counted)
    return stated, len(counted)
