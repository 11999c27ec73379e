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
With `prompt_grounding` and the tokenizer, the corpus's and the live overlay's continuations are first reranked by
how much of each token's text the row's prompt contains (grounding.py).
"""

from __future__ import annotations

import heapq
import itertools
import logging
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tasc_ray.spec.calibration import AcceptanceCalibration, Key, calibration_key
from tasc_ray.spec.config import DrafterConfig, DraftMode
from tasc_ray.spec.draft_length import StepCost, best_draft_length, ragged_draft_lengths
from tasc_ray.spec.grounding import PromptGrounding
from tasc_ray.spec.index import DEFAULT_MAX_ORDER, Match, NgramIndex
from tasc_ray.spec.live import LiveNgrams, combine_matches, longest_suffix
from tasc_ray.spec.suffix import MAX_MATCH, SuffixMatch, TokenStore

logger = logging.getLogger(__name__)

__all__ = ["Drafter", "DrafterConfig", "DraftMode", "DraftContext", "DraftTree", "build_drafter"]


@dataclass
class DraftContext:
    """One row's tokens so far: its n-gram table, (last m tokens) -> {next token: count}, and (with long matches)
    a TokenStore of them; with prompt grounding, the prompt's text and the row's token weights."""

    max_order: int
    long_matches: bool = False
    tokens: list[int] = field(default_factory=list)
    table: dict[tuple[int, ...], dict[int, int]] = field(default_factory=lambda: defaultdict(dict))
    store: TokenStore | None = None
    prompt_text: str | None = None
    grounding_weights: dict[int, float] = field(default_factory=dict)

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
class DraftTree:
    """A row's draft as a token tree: node j is `tokens[j]`, the child of node `parents[j]` (-1: of the row's
    pending token). Parents come before their children, and the nodes are in the order they were chosen (their
    estimated probabilities of acceptance, `scores`, never increase), so any prefix of the nodes is a tree. A
    chain is the tree whose node j has parent j - 1."""

    tokens: list[int] = field(default_factory=list)
    parents: list[int] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.tokens)

    def depth(self, j: int) -> int:
        """1 for a child of the pending token."""
        d = 0
        while j != -1:
            j, d = self.parents[j], d + 1
        return d

    def prefix(self, n: int) -> DraftTree:
        return DraftTree(self.tokens[:n], self.parents[:n], self.scores[:n])

    def accepted_path(self, target: Sequence[int]) -> list[int]:
        """The nodes a greedy verifier accepts: from the root, the child whose token is the target's own token at
        the current node (target[0] after the pending token, target[1 + j] after node j), while there is one."""
        path: list[int] = []
        current = -1
        while True:
            want = target[0 if current == -1 else 1 + current]
            child = next(
                (j for j, (t, p) in enumerate(zip(self.tokens, self.parents)) if p == current and t == want), None
            )
            if child is None:
                return path
            path.append(child)
            current = child


@dataclass
class _Candidate:
    """One source's proposal for the next draft token: its longest match's top continuation."""

    source: str
    length: int  # tokens matched
    token: int
    share: float  # raw: the share of the match's occurrences that continue with `token`
    walk: SuffixMatch | None = None  # a long match, to advance with the draft


GROUNDING_POOL = 8  # continuations per source that prompt grounding reranks (the index keeps its top 8)


class Drafter:
    """Context/corpus/live drafter. `index` may be None in context mode or with live_outputs; `tokenizer` (the
    model's) is what prompt grounding reads tokens with."""

    def __init__(
        self, index: NgramIndex | None = None, config: DrafterConfig | None = None, tokenizer: Any = None
    ) -> None:
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
        grounded = tokenizer is not None and self.config.prompt_grounding and self.config.mode != DraftMode.CONTEXT
        self.grounding = PromptGrounding(tokenizer) if grounded else None
        # (raw shares, keys, parents) of the last proposed drafts, until observed
        self._proposed: list[tuple[list[float], list[Key], list[int]]] | None = None

    def new_row(self, prompt_ids: Sequence[int]) -> DraftContext:
        state = DraftContext(self.config.context_order, self.config.long_matches)
        state.extend(prompt_ids)
        if self.grounding is not None:
            state.prompt_text = self.grounding.prompt_text(prompt_ids)
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
            items = [(rows[i], drafts[i], walks[i]) for i in active]
            for i, candidates in zip(active, self._candidates(items)):  # type: ignore[arg-type]
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
        drafts = [d[:n] for d, n in zip(drafts, _cut(scores, step_cost, ragged))]
        self._proposed = [
            (f[: len(d)], kk[: len(d)], list(range(-1, len(d) - 1))) for f, kk, d in zip(factors, keys, drafts)
        ]
        return drafts

    def propose_trees(
        self,
        rows: Sequence[DraftContext | None],
        limits: Sequence[int] | None = None,
        step_cost: StepCost | None = None,
        ragged: bool = False,
    ) -> list[DraftTree]:
        """A token tree of at most tree_nodes nodes (and depth min(max_draft, limits[i])) for each row (none for a
        row without a context): best-first, the most probable reachable token next, each node's children from every
        source's top tree_branches continuations of its match, scored by calibrated acceptance, until the next one's
        path probability falls below min_path_prob; with `step_cost`, cut to the nodes that pay, as `propose` cuts
        chains (a tree's nodes come in falling probability, so any prefix is a tree)."""
        k, budget, branches = self.config.max_draft, self.config.tree_nodes, self.config.tree_branches
        limits = [k] * len(rows) if limits is None else [min(k, lim) for lim in limits]
        built = [self._tree(row, budget, limit, branches) for row, limit in zip(rows, limits)]
        lengths = _cut([tree.scores for tree, _, _ in built], step_cost, ragged)
        self._proposed = [(f[:n], kk[:n], tree.parents[:n]) for (tree, f, kk), n in zip(built, lengths)]
        return [tree.prefix(n) for (tree, _, _), n in zip(built, lengths)]

    def _tree(
        self, row: DraftContext | None, budget: int, limit: int, branches: int
    ) -> tuple[DraftTree, list[float], list[Key]]:
        """One row's tree, with each node's raw share and calibration key."""
        tree, factors, keys = DraftTree(), list[float](), list[Key]()
        if row is None or budget <= 0 or limit <= 0:
            return tree, factors, keys
        heap: list[tuple[float, int, int, _Candidate]] = []  # (-path probability, tie, parent node, candidate)
        tie = itertools.count()
        paths: dict[int, list[int]] = {-1: []}
        walks: dict[int, dict[str, SuffixMatch | None]] = {-1: {}}
        probs: dict[int, float] = {-1: 1.0}

        def expand(node: int) -> None:
            depth = len(paths[node])
            if depth >= limit:
                return
            best: dict[int, tuple[float, _Candidate]] = {}
            for c in self._candidates([(row, paths[node], walks[node])], branches)[0]:
                q = self._acceptance(c, depth) if self.config.calibrate else c.share
                if c.token not in best or q > best[c.token][0]:
                    best[c.token] = (q, c)
            for q, c in best.values():
                heapq.heappush(heap, (-probs[node] * q, next(tie), node, c))

        expand(-1)
        while heap and len(tree) < budget:
            neg, _, parent, cand = heapq.heappop(heap)
            if -neg < self.config.min_path_prob:
                break
            j = len(tree)
            tree.tokens.append(cand.token)
            tree.parents.append(parent)
            tree.scores.append(-neg)
            factors.append(cand.share)
            keys.append(calibration_key(cand.source, cand.length, len(paths[parent])))
            paths[j], probs[j] = paths[parent] + [cand.token], -neg
            # the child's long matches: each source's match at the parent, advanced by the chosen token
            walks[j] = {
                s: w.advance(cand.token) for s, w in {**walks[parent], cand.source: cand.walk}.items() if w is not None
            }
            expand(j)
        return tree, factors, keys

    def _candidates(
        self, items: Sequence[tuple[DraftContext, list[int], dict[str, SuffixMatch | None]]], top_n: int = 1
    ) -> list[list[_Candidate]]:
        """For each (row, path drafted so far, long matches walked to it), every source's top_n proposals: a long
        match walked on from the last step, else a fresh lookup (the source's TokenStore, then its n-gram tables;
        the index's tables batched over the items). With prompt grounding, the corpus and live sources' top
        GROUNDING_POOL are reranked against the row's prompt and their top_n kept."""
        mode = self.config.mode
        pool = max(top_n, GROUNDING_POOL) if self.grounding is not None else top_n
        use_context, use_corpus = mode != DraftMode.CORPUS, mode != DraftMode.CONTEXT
        out: list[list[_Candidate]] = []
        short_corpus: list[int] = []  # positions in `out` whose corpus source needs the index's tables
        histories: list[list[int]] = []
        for n, (row, path, walks) in enumerate(items):
            history = row.tokens[-MAX_MATCH:] + path
            cands: list[_Candidate] = []
            sources: list[tuple[str, TokenStore | None]] = []
            if use_context:
                sources.append(("context", row.store))
            if use_corpus:
                sources.append(("corpus", self.corpus_store))
                if self.live is not None and len(self.live):
                    sources.append(("live", self.live.store))
            for source, store in sources:
                walk = walks.get(source)
                if walk is None and store is not None:
                    walk = store.longest_match(history)
                if walk is not None:
                    tops, shares = walk.continuations(top_n if source == "context" else pool)
                    if len(tops):
                        cands += [_Candidate(source, walk.length, int(t), float(p), walk) for t, p in zip(tops, shares)]
                        continue
                if source == "context":
                    found = row.longest_match(path)
                    if found is not None:
                        m, nexts = found
                        total = sum(nexts.values())
                        ranked = sorted(nexts, key=lambda t: (-nexts[t], t))[:top_n]
                        cands += [_Candidate("context", m, t, nexts[t] / total) for t in ranked]
                elif source == "live":
                    assert self.live is not None
                    match = self.live.longest_matches([history])[0]
                    if match is not None:
                        cands += _short("live", match, pool)
                elif self.index is not None:
                    short_corpus.append(n)
                    histories.append(history[-(self.index.max_order - 1) :])
            out.append(cands)
        if short_corpus:
            assert self.index is not None
            for n, match in zip(short_corpus, self.index.longest_matches(histories)):
                if match is not None:
                    out[n] += _short("corpus", match, pool)
        if self.grounding is not None:
            out = [self._grounded(row, cands, top_n) for (row, _, _), cands in zip(items, out)]
        return out

    def _grounded(self, row: DraftContext, candidates: list[_Candidate], top_n: int) -> list[_Candidate]:
        """The row's candidates with the corpus and live sources' reranked by prompt grounding, top_n of each."""
        assert self.grounding is not None
        out = [c for c in candidates if c.source == "context"]
        for source in ("corpus", "live"):
            mine = [c for c in candidates if c.source == source]
            if mine and row.prompt_text is not None:  # None: a row that began under a drafter without grounding
                mine = self.grounding.rerank(mine, row.prompt_text, row.grounding_weights)
            out += mine[:top_n]
        return out

    def _choose(self, candidates: list[_Candidate], depth: int) -> tuple[_Candidate, float] | None:
        """The candidate to draft and its probability of acceptance: calibrated by source, match length and depth,
        or (calibrate off) the raw rule: the longer match wins, lambda mixes context and corpus at equal length."""
        if not candidates:
            return None
        if self.config.calibrate:
            probs = [self._acceptance(c, depth) for c in candidates]
            best = int(np.argmax(probs))
            return candidates[best], probs[best]
        return self._mix(candidates)

    def _acceptance(self, c: _Candidate, depth: int) -> float:
        """The calibrated chance that candidate `c`, drafted at `depth`, is accepted once its prefix was."""
        return self.calibration(c.share, calibration_key(c.source, c.length, depth))

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

    def learn(self, output: Sequence[int], row: DraftContext | None = None) -> None:
        """A finished output: its n-grams join the live overlay (with live_outputs > 0); with its row, prompt
        grounding learns which of its words the prompt held."""
        if self.live is not None:
            self.live.add(output)
        if self.grounding is not None and row is not None and row.prompt_text is not None:
            self.grounding.learn(output, row.prompt_text)

    def observe(self, accepted: Sequence[int | Sequence[int]]) -> None:
        """Learn from the verification of the last proposed drafts: row i's chain had accepted[i] tokens taken, or
        its tree the nodes accepted[i] (its accepted path)."""
        proposed, self._proposed = self._proposed, None
        if proposed is None or len(proposed) != len(accepted):
            return
        for (factors, keys, parents), taken in zip(proposed, accepted):
            nodes = list(range(taken)) if isinstance(taken, int) else list(taken)
            self.calibration.observe_tree(factors, keys, parents, nodes)


def _cut(scores: list[list[float]], step_cost: StepCost | None, ragged: bool) -> list[int]:
    """How many of each row's draft tokens (tree nodes) to verify, given the estimated probabilities that each
    prefix is accepted: where expected tokens per second of the pass is highest, per row where the verifier does not
    pad rows to the longest draft (`ragged`), else one length for all; everything without a step cost."""
    if step_cost is None or not scores:
        return [len(s) for s in scores]
    if ragged:
        share = getattr(step_cost, "padding_share", 0.0)  # a StepCostTable's measured share
        return ragged_draft_lengths(scores, step_cost, share)
    return [best_draft_length(scores, step_cost)] * len(scores)


def _short(source: str, match: Match, top_n: int = 1) -> list[_Candidate]:
    return [
        _Candidate(source, match.order, int(t), float(p))
        for t, p in zip(match.next_tokens[:top_n].tolist(), match.probs[:top_n].tolist())
    ]


def _as_match(c: _Candidate | None) -> Match | None:
    """A candidate as a one-continuation Match (for the raw rule's mixing)."""
    if c is None:
        return None
    return Match(c.length, np.array([c.token], dtype=np.int64), np.array([c.share]))


def build_drafter(index: NgramIndex | None, config: DrafterConfig, tokenizer: Any = None) -> Drafter:
    """A Drafter over `index`; without one, drafting uses the row's own context (prompt lookup) and, with
    live_outputs, the outputs the engine has finished. `tokenizer`: the model's, for prompt grounding."""
    effective = config.for_index(index is not None)
    if effective is not config:
        logger.info("no index given: drafting from the prompt's own n-grams only (context mode)")
    elif index is None and config.mode != DraftMode.CONTEXT:
        logger.info("no index given: drafting from the prompt's n-grams and the outputs finished so far")
    return Drafter(index, effective, tokenizer)
