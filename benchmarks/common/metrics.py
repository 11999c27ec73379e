"""Task quality metrics of the benchmarks: slot F1, exact match, corpus BLEU and chrF come from the package
(`tasc_ray.metrics`, which `tasc-ray ft-pipeline` uses too); here are the benchmarks' own: slot scores in percent, a
built-in task's headline metric, the share of an MR's values a sentence states, and the share of outputs identical
between two decodings."""

from __future__ import annotations

import re
from collections.abc import Sequence

from tasc_ray.metrics import (  # the package's metrics, re-exported for the benchmarks
    SLOT,
    corpus_text_score,
    exact_match,
    micro_f1,
    parse_slots,
    slot_counts,
    slot_f1,
    text_scores,
    text_segment_stats,
)

__all__ = [
    "SLOT",
    "corpus_text_score",
    "exact_match",
    "micro_f1",
    "parse_slots",
    "prompt_slots",
    "share_identical",
    "slot_counts",
    "slot_f1",
    "slot_scores",
    "stated_values",
    "task_quality",
    "text_scores",
    "text_segment_stats",
]


def slot_scores(preds: Sequence[str], refs: Sequence[str]) -> dict[str, float]:
    """Exact match (the same slot set) and micro slot F1, in percent."""
    tp, n_pred, n_ref, exact = slot_counts(preds, refs)
    return {"exact_match": 100 * exact / max(1, len(refs)), "slot_f1": 100 * micro_f1(tp, n_pred, n_ref)}


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
