"""Drafter: a token tree per row from three sources of matches, each candidate scored by calibrated acceptance.

The interface is small, after Hugging Face's `CandidateGenerator`: `new_row(prompt)` starts a row's state,
`propose(rows, limits, branching)` drafts for a batch, `observe(trees, paths)` learns what verification took, and
`learn(output)` takes a finished output. The sources, each answering with the continuations of its longest match
with the row's history (prompt + output so far + the draft's path so far):

- context: the row's own tokens (prompt lookup);
- corpus: the task's n-gram index (index.py);
- live: the outputs finished so far (live.py), an overlay of the corpus that follows the task as it runs.

Matches of 1-3 tokens come from n-gram tables, longer ones from TokenStores (suffix.py), whose matches walk forward
with the draft (`SuffixMatch.advance`), so a row costs one store lookup per source and pass.

One rule combines the sources: every candidate's chance of acceptance is read from the calibration (its measured
acceptance by source, match length and depth, calibration.py), and the tree grows best-first, the most probable
reachable candidate next, until the next one's path probability falls below `min_path_prob` or the node budget
is spent. With `branching` off a node keeps only its best child, so the tree is a chain. (Raw-frequency rules,
lambda mixing of corpus and context and prompt grounding were measured against this in the simulator,
benchmarks/results/drafters_sim.md, and removed.)
"""

from __future__ import annotations

import heapq
import itertools
import logging
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

from tasc_ray.engine.config import DrafterConfig, DraftMode
from tasc_ray.engine.drafts.calibration import AcceptanceCalibration, calibration_key
from tasc_ray.engine.drafts.index import DEFAULT_MAX_ORDER, Match, NgramIndex
from tasc_ray.engine.drafts.live import LiveNgrams, longest_suffix
from tasc_ray.engine.drafts.suffix import MAX_MATCH, SuffixMatch, TokenStore
from tasc_ray.engine.drafts.tree import DraftTree

logger = logging.getLogger(__name__)

__all__ = ["DraftContext", "DraftTree", "Drafter", "DrafterConfig", "DraftMode", "build_drafter"]

CONTEXT_ORDER = 4  # the row's own n-gram table answers matches of up to 3 tokens; its TokenStore longer ones
TREE_BRANCHES = 3  # continuations per source a tree node considers (a chain node considers each source's best)


@dataclass
class DraftContext:
    """One row's tokens so far: its n-gram table, (last m tokens) -> {next token: count}, and a TokenStore of them
    for matches of any length."""

    max_order: int = CONTEXT_ORDER
    tokens: list[int] = field(default_factory=list)
    table: dict[tuple[int, ...], dict[int, int]] = field(default_factory=lambda: defaultdict(dict))
    store: TokenStore = field(default_factory=TokenStore)

    def extend(self, new_tokens: Sequence[int]) -> None:
        """Append accepted tokens, counting each as the continuation of its 1..max_order-1 preceding tokens."""
        tokens, table = self.tokens, self.table
        for tok in new_tokens:
            n = len(tokens)
            for m in range(1, min(self.max_order - 1, n) + 1):
                nexts = table[tuple(tokens[n - m :])]
                nexts[tok] = nexts.get(tok, 0) + 1
            tokens.append(tok)
        self.store.append(new_tokens)

    def longest_match(self, suffix_extra: Sequence[int] = ()) -> tuple[int, dict[int, int]] | None:
        """(its length m, continuation counts) of the longest suffix of tokens + suffix_extra (at most
        max_order - 1 tokens) seen earlier in the row."""
        history = self.tokens[-(self.max_order - 1) :] + list(suffix_extra) if suffix_extra else self.tokens
        return longest_suffix(self.table, history, self.max_order)


@dataclass
class _Candidate:
    """One source's proposal for the next draft token: a continuation of its longest match."""

    source: str
    length: int  # tokens matched
    token: int
    share: float  # raw: the share of the match's occurrences that continue with `token`
    walk: SuffixMatch | None = None  # a long match, to advance with the draft


@dataclass
class _Growing:
    """A row's tree while it is built: the frontier of candidate children, and each node's path and matches."""

    row: DraftContext
    depth_limit: int
    node_limit: int
    tree: DraftTree = field(default_factory=DraftTree)
    frontier: list[tuple[float, int, int, _Candidate]] = field(default_factory=list)  # (-path prob, tie, parent, c)
    paths: dict[int, list[int]] = field(default_factory=lambda: {-1: []})
    probs: dict[int, float] = field(default_factory=lambda: {-1: 1.0})
    walks: dict[int, dict[str, SuffixMatch]] = field(default_factory=lambda: {-1: {}})


class Drafter:
    """Context/corpus/live drafter. `index` may be None in context mode or with live_outputs."""

    def __init__(self, index: NgramIndex | None = None, config: DrafterConfig | None = None) -> None:
        self.config = config or DrafterConfig()
        self.index = index
        if self.config.mode != DraftMode.CONTEXT and index is None and self.config.live_outputs == 0:
            raise ValueError(f"draft mode {self.config.mode.value!r} needs an n-gram index or live_outputs > 0")
        live_on = self.config.live_outputs > 0 and self.config.mode != DraftMode.CONTEXT
        self.live = LiveNgrams(self._order, self.config.live_outputs) if live_on else None
        self.corpus_store = index.suffix if index is not None else None
        self.calibration = AcceptanceCalibration()
        self._tie = itertools.count()

    @property
    def _order(self) -> int:
        return self.index.max_order if self.index is not None else DEFAULT_MAX_ORDER

    def reconfigured(self, index: NgramIndex | None, config: DrafterConfig) -> Drafter:
        """A drafter over `index` with `config` that keeps what this one learned: the live overlay's outputs (the
        newest, up to the new capacity) and the calibration."""
        new = build_drafter(index, config)
        new.calibration = self.calibration
        if new.live is not None and self.live is not None:
            for output in self.live.outputs()[-new.live.capacity :]:
                new.live.add(output)
        return new

    def new_row(self, prompt_ids: Sequence[int]) -> DraftContext:
        state = DraftContext()
        state.extend(prompt_ids)
        return state

    def propose(
        self, rows: Sequence[DraftContext | None], limits: Sequence[int] | None = None, branching: bool = False
    ) -> list[DraftTree]:
        """A draft tree for each row (empty for a row without a context: it does not speculate), at most
        min(max_draft, limits[i]) deep; with `branching`, up to tree_nodes nodes with several children per node,
        else a chain. Nodes come best-first (falling path probability), so the caller may cut any prefix."""
        k = self.config.max_draft
        limits = [k] * len(rows) if limits is None else [min(k, lim) for lim in limits]
        trees = [DraftTree() for _ in rows]
        nodes = self.config.tree_nodes if branching else k
        growing = [
            _Growing(row, lim, nodes if branching else lim, tree)
            for row, lim, tree in zip(rows, limits, trees)
            if row is not None and lim > 0 and nodes > 0
        ]
        self._expand([(g, -1) for g in growing], branching)
        while growing:
            added = [(g, node) for g in growing if (node := self._grow(g)) is not None]
            growing = [g for g, _ in added if len(g.tree) < g.node_limit]
            self._expand([(g, node) for g, node in added if len(g.tree) < g.node_limit], branching)
        return trees

    def _grow(self, g: _Growing) -> int | None:
        """Add the frontier's most probable candidate to the tree; None when none is left above min_path_prob."""
        if not g.frontier:
            return None
        neg, _, parent, cand = heapq.heappop(g.frontier)
        if -neg < self.config.min_path_prob:
            g.frontier.clear()
            return None
        j, tree = len(g.tree), g.tree
        tree.tokens.append(cand.token)
        tree.parents.append(parent)
        tree.scores.append(-neg)
        tree.shares.append(cand.share)
        tree.keys.append(calibration_key(cand.source, cand.length, len(g.paths[parent])))
        g.paths[j], g.probs[j] = g.paths[parent] + [cand.token], -neg
        # the node's long matches: each source's match at the parent, advanced by the chosen token
        advanced = {source: w.advance(cand.token) for source, w in g.walks[parent].items()}
        g.walks[j] = {source: w for source, w in advanced.items() if w is not None}
        return j

    def _expand(self, nodes: list[tuple[_Growing, int]], branching: bool) -> None:
        """Put the children candidates of each (tree, node) on its tree's frontier: every source's continuations
        of the node's path, scored by calibrated acceptance; a chain keeps only the node's best one."""
        nodes = [(g, n) for g, n in nodes if len(g.paths[n]) < g.depth_limit]
        if not nodes:
            return
        items = [(g.row, g.paths[n], g.walks[n]) for g, n in nodes]
        for (g, node), candidates in zip(nodes, self._candidates(items, TREE_BRANCHES if branching else 1)):
            depth = len(g.paths[node])
            g.walks[node] = {c.source: c.walk for c in candidates if c.walk is not None}
            best: dict[int, tuple[float, _Candidate]] = {}
            for c in candidates:
                q = self.calibration(c.share, calibration_key(c.source, c.length, depth))
                if c.token not in best or q > best[c.token][0]:
                    best[c.token] = (q, c)
            children = sorted(best.values(), key=lambda qc: -qc[0])
            for q, c in children if branching else children[:1]:
                heapq.heappush(g.frontier, (-g.probs[node] * q, next(self._tie), node, c))

    def _candidates(
        self, items: Sequence[tuple[DraftContext, list[int], dict[str, SuffixMatch]]], top_n: int
    ) -> list[list[_Candidate]]:
        """For each (row, path drafted so far, long matches walked to it), every source's top_n continuations: a
        long match walked on from the parent, else a fresh lookup (the source's TokenStore, then its n-gram tables;
        the index's tables batched over the items)."""
        mode = self.config.mode
        sources: list[str] = []
        if mode != DraftMode.CORPUS:
            sources.append("context")
        if mode != DraftMode.CONTEXT:
            sources += ["corpus"] + (["live"] if self.live is not None and len(self.live) else [])
        out: list[list[_Candidate]] = []
        short_corpus: list[int] = []  # positions in `out` whose corpus source needs the index's tables
        histories: list[list[int]] = []
        for n, (row, path, walks) in enumerate(items):
            history = row.tokens[-MAX_MATCH:] + path
            cands: list[_Candidate] = []
            for source in sources:
                walk = walks.get(source) or self._long_match(source, row, history)
                if walk is not None:
                    tops, shares = walk.continuations(top_n)
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
                        cands += _short("live", match, top_n)
                elif self.index is not None:
                    short_corpus.append(n)
                    histories.append(history[-(self.index.max_order - 1) :])
            out.append(cands)
        if short_corpus:
            assert self.index is not None
            for n, match in zip(short_corpus, self.index.longest_matches(histories)):
                if match is not None:
                    out[n] += _short("corpus", match, top_n)
        return out

    def _long_match(self, source: str, row: DraftContext, history: list[int]) -> SuffixMatch | None:
        stores = {"context": row.store, "corpus": self.corpus_store, "live": self.live.store if self.live else None}
        store = stores[source]
        return store.longest_match(history) if store is not None else None

    def observe(self, trees: Sequence[DraftTree], paths: Sequence[Sequence[int]]) -> None:
        """Learn from a verification pass: row i's tree had the nodes paths[i] accepted (its accepted path)."""
        for tree, path in zip(trees, paths):
            if len(tree.keys) == len(tree):  # a tree this drafter built (others carry no evidence)
                self.calibration.observe(tree.shares, tree.keys, tree.parents, path)

    def learn(self, output: Sequence[int]) -> None:
        """A finished output: its n-grams join the live overlay (with live_outputs > 0)."""
        if self.live is not None:
            self.live.add(output)


def _short(source: str, match: Match, top_n: int) -> list[_Candidate]:
    return [
        _Candidate(source, match.order, int(t), float(p))
        for t, p in zip(match.next_tokens[:top_n].tolist(), match.probs[:top_n].tolist())
    ]


def build_drafter(index: NgramIndex | None, config: DrafterConfig) -> Drafter:
    """A Drafter over `index`; without one, drafting uses the row's own context (prompt lookup) and, with
    live_outputs, the outputs the engine has finished."""
    effective = config.for_index(index is not None)
    if effective is not config:
        logger.info("no index given: drafting from the prompt's own n-grams only (context mode)")
    elif index is None and config.mode != DraftMode.CONTEXT:
        logger.info("no index given: drafting from the prompt's n-grams and the outputs finished so far")
    return Drafter(index, effective)
