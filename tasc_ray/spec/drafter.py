"""Drafter: proposes up to k draft tokens per row from three sources of matches, scored by calibrated acceptance.

The interface is small, after Hugging Face's `CandidateGenerator`: `new_row(prompt)` starts a row's state,
`propose(rows, limits)` drafts for a batch, `observe(accepted)` learns what verification took, and `learn(output)`
takes a finished output. The sources, each giving the continuations of its longest match with the row's history
(prompt + output so far + draft so far):

- context: the row's own tokens (prompt lookup): an n-gram table for matches of 1..3 tokens, a TokenStore
  (suffix.py) for matches of any length;
- corpus: the task's index (index.py): top-K tables for 1..3 tokens, and its TokenStore when it has one;
- live: the outputs finished so far (live.py), the same two ways.

Each draft step takes, per source, the top continuation of its longest match and its raw share, and asks the
calibration (calibration.py) what such a token is worth: its measured chance of acceptance by source, match length
and depth. The most probable token is drafted; the draft stops when the product of those probabilities falls below
`min_path_prob`, and `propose` cuts it where expected tokens per second of the verification pass is highest. Long
matches walk forward with the draft (`SuffixMatch.advance`), so a row costs one store lookup per source and pass.
With `calibrate` off, raw shares decide: the longer match wins and lambda mixes corpus and context at equal length.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from tasc_ray.spec.calibration import AcceptanceCalibration, Key, calibration_key
from tasc_ray.spec.config import DrafterConfig, DraftMode
from tasc_ray.spec.draft_length import StepCost, best_draft_length, ragged_draft_lengths
from tasc_ray.spec.index import DEFAULT_MAX_ORDER, Match, NgramIndex
from tasc_ray.spec.live import LiveNgrams, combine_matches, longest_suffix
from tasc_ray.spec.suffix import MAX_MATCH, SuffixMatch, TokenStore

logger = logging.getLogger(__name__)

__all__ = ["Drafter", "DrafterConfig", "DraftMode", "DraftContext", "build_drafter"]


@dataclass
class DraftContext:
    """One row's tokens so far: its n-gram table, (last m tokens) -> {next token: count}, and (with long matches)
    a TokenStore of them."""

    max_order: int
    long_matches: bool = False
    tokens: list[int] = field(default_factory=list)
    table: dict[tuple[int, ...], dict[int, int]] = field(default_factory=lambda: defaultdict(dict))
    store: TokenStore | None = None

    def __post_init__(self) -> None:
        if self.long_matches and self.store is None:
            self.store = TokenStore()

    def extend(self, new_tokens: Sequence[int]) -> None:
        """Append accepted tokens, counting each as the continuation of its 1..max_order-1 preceding tokens."""
        tokens, table = self.tokens, self.table
        for tok in new_tokens:
            n = len(tokens)
            for m in range(1, min(self.max_order - 1, n) + 1):
                nexts = table[tuple(tokens[n - m :])]
                nexts[tok] = nexts.get(tok, 0) + 1
            tokens.append(tok)
        if self.store is not None:
            self.store.append(new_tokens)

    def longest_match(self, suffix_extra: Sequence[int] = ()) -> tuple[int, dict[int, int]] | None:
        """(its length m, continuation counts) of the longest suffix of tokens + suffix_extra (at most
        max_order - 1 tokens) seen earlier in the row."""
        history = self.tokens[-(self.max_order - 1) :] + list(suffix_extra) if suffix_extra else self.tokens
        return longest_suffix(self.table, history, self.max_order)


@dataclass
class _Candidate:
    """One source's proposal for the next draft token: its longest match's top continuation."""

    source: str
    length: int  # tokens matched
    token: int
    share: float  # raw: the share of the match's occurrences that continue with `token`
    walk: SuffixMatch | None = None  # a long match, to advance with the draft


class Drafter:
    """Context/corpus/live drafter. `index` may be None in context mode or with live_outputs."""

    def __init__(self, index: NgramIndex | None = None, config: DrafterConfig | None = None) -> None:
        self.config = config or DrafterConfig()
        self.index = index
        if self.config.mode != DraftMode.CONTEXT and index is None and self.config.live_outputs == 0:
            raise ValueError(f"draft mode {self.config.mode.value!r} needs an n-gram index or live_outputs > 0")
        order = index.max_order if index is not None else DEFAULT_MAX_ORDER
        capacity = self.config.live_outputs
        long = self.config.long_matches
        live_on = capacity and self.config.mode != DraftMode.CONTEXT
        self.live = LiveNgrams(order, capacity, long_matches=long) if live_on else None
        self.corpus_store = index.suffix if index is not None and long else None
        self.calibration = AcceptanceCalibration()
        self._proposed: list[tuple[list[float], list[Key]]] | None = None  # until observed

    def new_row(self, prompt_ids: Sequence[int]) -> DraftContext:
        state = DraftContext(self.config.context_order, self.config.long_matches)
        state.extend(prompt_ids)
        return state

    def propose(
        self,
        rows: Sequence[DraftContext | None],
        limits: Sequence[int] | None = None,
        step_cost: StepCost | None = None,
        ragged: bool = False,
    ) -> list[list[int]]:
        """Draft up to min(max_draft, limits[i]) tokens for each row (none for a row without a context: it does
        not speculate); with `step_cost`, cut the drafts where expected tokens per second of the batched
        verification pass is highest: each row to its own length where the verifier does not pad rows to the
        longest draft (`ragged`), else all to one length."""
        k = self.config.max_draft
        limits = [k] * len(rows) if limits is None else [min(k, lim) for lim in limits]
        limits = [lim if row is not None else 0 for row, lim in zip(rows, limits)]
        drafts: list[list[int]] = [[] for _ in rows]
        factors: list[list[float]] = [[] for _ in rows]  # raw share of each draft token
        keys: list[list[Key]] = [[] for _ in rows]
        scores: list[list[float]] = [[] for _ in rows]  # estimated P(first j+1 draft tokens all accepted)
        walks: list[dict[str, SuffixMatch | None]] = [{} for _ in rows]
        active = [i for i, lim in enumerate(limits) if lim > 0]
        while active:
            still_active = []
            for i, candidates in zip(active, self._candidates(rows, drafts, walks, active)):
                pick = self._choose(candidates, len(drafts[i]))
                if pick is None:
                    continue
                cand, prob = pick
                path = (scores[i][-1] if scores[i] else 1.0) * prob
                if path < self.config.min_path_prob:
                    continue
                drafts[i].append(cand.token)
                factors[i].append(cand.share)
                keys[i].append(calibration_key(cand.source, cand.length, len(drafts[i]) - 1))
                scores[i].append(path)
                walks[i] = {c.source: c.walk.advance(cand.token) for c in candidates if c.walk is not None}
                if len(drafts[i]) < limits[i]:
                    still_active.append(i)
            active = still_active
        if step_cost is not None and drafts:
            if ragged:
                share = getattr(step_cost, "padding_share", 0.0)  # a StepCostTable's measured share
                drafts = [d[:n] for d, n in zip(drafts, ragged_draft_lengths(scores, step_cost, share))]
            else:
                length = best_draft_length(scores, step_cost)
                drafts = [d[:length] for d in drafts]
        self._proposed = [(f[: len(d)], kk[: len(d)]) for f, kk, d in zip(factors, keys, drafts)]
        return drafts

    def _candidates(
        self,
        rows: Sequence[DraftContext | None],
        drafts: list[list[int]],
        walks: list[dict[str, SuffixMatch | None]],
        active: list[int],
    ) -> list[list[_Candidate]]:
        """Each active row's proposals from every source: a long match walked on from the last step, else a fresh
        lookup (the source's TokenStore, then its n-gram tables; the index's tables batched over the rows)."""
        mode = self.config.mode
        use_context, use_corpus = mode != DraftMode.CORPUS, mode != DraftMode.CONTEXT
        out: list[list[_Candidate]] = []
        short_corpus: list[int] = []  # positions in `out` whose corpus source needs the index's tables
        histories: list[list[int]] = []
        for n, i in enumerate(active):
            row = rows[i]
            assert row is not None
            history = row.tokens[-MAX_MATCH:] + drafts[i]
            cands: list[_Candidate] = []
            sources: list[tuple[str, TokenStore | None]] = []
            if use_context:
                sources.append(("context", row.store))
            if use_corpus:
                sources.append(("corpus", self.corpus_store))
                if self.live is not None and len(self.live):
                    sources.append(("live", self.live.store))
            for source, store in sources:
                walk = walks[i].get(source)
                if walk is None and store is not None:
                    walk = store.longest_match(history)
                if walk is not None:
                    top, shares = walk.continuations(1)
                    if len(top):
                        cands.append(_Candidate(source, walk.length, int(top[0]), float(shares[0]), walk))
                        continue
                if source == "context":
                    found = row.longest_match(drafts[i])
                    if found is not None:
                        m, nexts = found
                        token = max(nexts, key=nexts.__getitem__)
                        cands.append(_Candidate("context", m, token, nexts[token] / sum(nexts.values())))
                elif source == "live":
                    assert self.live is not None
                    match = self.live.longest_matches([history])[0]
                    if match is not None:
                        cands.append(_short("live", match))
                elif self.index is not None:
                    short_corpus.append(n)
                    histories.append(history[-(self.index.max_order - 1) :])
            out.append(cands)
        if short_corpus:
            assert self.index is not None
            for n, match in zip(short_corpus, self.index.longest_matches(histories)):
                if match is not None:
                    out[n].append(_short("corpus", match))
        return out

    def _choose(self, candidates: list[_Candidate], depth: int) -> tuple[_Candidate, float] | None:
        """The candidate to draft and its probability of acceptance: calibrated by source, match length and depth,
        or (calibrate off) the raw rule: the longer match wins, lambda mixes context and corpus at equal length."""
        if not candidates:
            return None
        if self.config.calibrate:
            probs = [self.calibration(c.share, calibration_key(c.source, c.length, depth)) for c in candidates]
            best = int(np.argmax(probs))
            return candidates[best], probs[best]
        return self._mix(candidates)

    def _mix(self, candidates: list[_Candidate]) -> tuple[_Candidate, float] | None:
        """The raw rule over the top continuations: corpus and live (same length: averaged) against context (the
        longer match wins; same length: p = lambda * p_corpus + (1 - lambda) * p_context)."""
        by_source = {c.source: c for c in candidates}
        corpus = combine_matches(*(_as_match(by_source.get(s)) for s in ("corpus", "live")))
        context = by_source.get("context")
        if corpus is not None and context is not None and context.length != corpus.order:
            if context.length > corpus.order:
                corpus = None
            else:
                context = None
        if corpus is None:
            return (context, context.share) if context is not None else None
        share: dict[int, float] = {int(t): float(p) for t, p in zip(corpus.next_tokens, corpus.probs)}
        if context is not None:
            lam = self.config.lam
            share = {t: lam * p for t, p in share.items()}
            share[context.token] = share.get(context.token, 0.0) + (1 - lam) * context.share
        token = max(share, key=share.__getitem__)
        source = next((c for c in candidates if c.token == token), candidates[0])
        return _Candidate(source.source, source.length, token, share[token], source.walk), share[token]

    def learn(self, output: Sequence[int]) -> None:
        """A finished output: its n-grams join the live overlay (with live_outputs > 0)."""
        if self.live is not None:
            self.live.add(output)

    def observe(self, accepted: Sequence[int]) -> None:
        """Learn from the verification of the last proposed drafts: accepted[i] draft tokens of row i were taken."""
        proposed, self._proposed = self._proposed, None
        if proposed is None or len(proposed) != len(accepted):
            return
        for (factors, keys), n in zip(proposed, accepted):
            self.calibration.observe(factors, n, keys)


def _short(source: str, match: Match) -> _Candidate:
    return _Candidate(source, match.order, int(match.next_tokens[0]), float(match.probs[0]))


def _as_match(c: _Candidate | None) -> Match | None:
    """A candidate as a one-continuation Match (for the raw rule's mixing)."""
    if c is None:
        return None
    return Match(c.length, np.array([c.token], dtype=np.int64), np.array([c.share]))


def build_drafter(index: NgramIndex | None, config: DrafterConfig) -> Drafter:
    """A Drafter over `index`; without one, drafting uses the row's own context (prompt lookup) and, with
    live_outputs, the outputs the engine has finished."""
    effective = config.for_index(index is not None)
    if effective is not config:
        logger.info("no index given: drafting from the prompt's own n-grams only (context mode)")
    elif index is None and config.mode != DraftMode.CONTEXT:
        logger.info("no index given: drafting from the prompt's n-grams and the outputs finished so far")
    return Drafter(index, effective)
