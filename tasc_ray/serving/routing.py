"""Prefix-aware routing of engine calls: rows that share a prompt prefix go to the same engine replica.

Each engine replica keeps a prefix cache (tasc_ray.engine.kv_cache.PrefixCache): a shared prompt prefix (a few-shot
template, a system prompt) of at least `prefix_cache_min_tokens` tokens is prefilled once and reused by the rows
that start with it, but only on the replica that saw it. Serve's default router (power of two choices) spreads a
template's requests over every replica, so each replica prefills it again and keeps it only while it is among its
last prompts. `PrefixAffinityRouter` (a Ray Serve `RequestRouter`, set on the engine deployment through
`request_router_config`: `ServeConfig.request_router`) sends a call to the replica that served the longest prefix
of its prompt, unless that replica is much busier than the least loaded one.

`PrefixTable` is the policy, without Ray: a prompt's token ids cut into blocks of `block_tokens`, each block's key
the hash of every token up to its end (so a key names a whole prefix, as vLLM's block hashes do), an LRU map from
key to the replica that owns the prefix. A call:

- whose prompt's longest known prefix is owned by a live replica goes there, if that replica's queue (Serve's
  ongoing requests) is at most `imbalance_threshold` longer than the shortest; else to the less loaded of two
  random replicas (power of two choices), so one template never piles its traffic on one replica;
- whose prefix nobody owns goes to the least loaded replica, the one owning the fewest prefixes among equals, and
  claims its blocks at once (so the next calls of a template that arrive before this one is routed follow it);
- without a prompt (`info`, `overlay`) is routed by power of two choices.

After routing, the blocks not yet owned by a live replica are given to the replica the call went to; an owner
keeps its prefixes (a call sent elsewhere for load does not move a template). A replica that dies loses its
prefixes. The state lives in each process that holds a handle (the ingress replicas, a labeling job's workers):
with several ingress replicas each learns the owners itself, from the same rule.
"""

from __future__ import annotations

import random
from collections import OrderedDict
from collections.abc import Hashable, Sequence
from typing import Any

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

DEFAULT_BLOCK_TOKENS = 16  # the engine's prefix_cache_min_tokens default
DEFAULT_IMBALANCE = 8
DEFAULT_MAX_PREFIXES = 200_000
MAX_PENDING_KEYS = 10_000


def prefix_keys(ids: Sequence[int], block_tokens: int) -> list[int]:
    """One key per whole block of `ids` (its last token left out: the engine prefills at least one token of a
    row itself), each the hash of every token up to the block's end: keys[i] names ids[: (i + 1) * block_tokens]."""
    keys: list[int] = []
    h = 0
    for end in range(block_tokens, len(ids), block_tokens):
        h = hash((h, tuple(ids[end - block_tokens : end])))
        keys.append(h)
    return keys


class PrefixTable:
    """Which replica owns which prompt prefix (module docstring); replicas are any hashable ids."""

    def __init__(
        self,
        block_tokens: int = DEFAULT_BLOCK_TOKENS,
        imbalance_threshold: int = DEFAULT_IMBALANCE,
        max_prefixes: int = DEFAULT_MAX_PREFIXES,
        rng: random.Random | None = None,
    ) -> None:
        self.block_tokens = max(1, block_tokens)
        self.imbalance_threshold = imbalance_threshold
        self.max_prefixes = max_prefixes
        self.owner: OrderedDict[int, Hashable] = OrderedDict()  # prefix key -> replica, least recently used first
        self.owned: dict[Hashable, int] = {}  # replica -> keys it owns
        self.rng = rng or random.Random()
        self.stats = {"matched": 0, "claimed": 0, "balanced": 0, "no_prompt": 0}

    def choose(self, keys: list[int], queues: dict[Hashable, int]) -> tuple[list[Hashable], str]:
        """Replicas to try in order for a call with these prefix keys, given each candidate's queue length, and
        why (matched, claimed, balanced, no_prompt)."""
        replicas = list(queues)
        if not replicas:
            return [], "no_prompt"
        if not keys:
            return self._two_choices(replicas, queues), self._count("no_prompt")
        least = min(queues.values())
        preferred = self._longest_owner(keys, queues)
        if preferred is not None:
            if queues[preferred] - least <= self.imbalance_threshold:
                rest = sorted((r for r in replicas if r != preferred), key=lambda r: queues[r])
                return [preferred, *rest], self._count("matched")
            return self._two_choices(replicas, queues), self._count("balanced")
        idle = [r for r in replicas if queues[r] == least]
        fewest = min(self.owned.get(r, 0) for r in idle)
        chosen = self.rng.choice([r for r in idle if self.owned.get(r, 0) == fewest])
        self.assign(keys, chosen, set(replicas))  # claimed now: the template's next calls follow it
        rest = sorted((r for r in replicas if r != chosen), key=lambda r: queues[r])
        return [chosen, *rest], self._count("claimed")

    def assign(self, keys: list[int], replica: Hashable, live: set[Hashable] | None = None) -> None:
        """The call with these keys went to `replica`: it owns every block no live replica owns yet."""
        for key in keys:
            current = self.owner.get(key)
            if current is not None and (live is None or current in live):
                self.owner.move_to_end(key)
                continue
            if current is not None:
                self.owned[current] -= 1
            self.owner[key] = replica
            self.owned[replica] = self.owned.get(replica, 0) + 1
        while len(self.owner) > self.max_prefixes:
            _, old = self.owner.popitem(last=False)
            self.owned[old] -= 1

    def drop(self, replica: Hashable) -> None:
        """A replica is gone: its prefixes are free again."""
        if not self.owned.pop(replica, 0):
            return
        for key in [k for k, r in self.owner.items() if r == replica]:
            del self.owner[key]

    def _longest_owner(self, keys: list[int], queues: dict[Hashable, int]) -> Hashable | None:
        for key in reversed(keys):
            replica = self.owner.get(key)
            if replica is not None and replica in queues:
                self.owner.move_to_end(key)
                return replica
        return None

    def _two_choices(self, replicas: list[Hashable], queues: dict[Hashable, int]) -> list[Hashable]:
        pair = self.rng.sample(replicas, 2) if len(replicas) > 1 else replicas
        return sorted(pair, key=lambda r: queues[r])

    def _count(self, reason: str) -> str:
        self.stats[reason] += 1
        return reason


def prompt_ids(pending_request: PendingRequest | None) -> list[int] | None:
    """The prompt's token ids of an engine call (`generate`, `stream`, `generate_batch_row`: the first argument),
    or None for a call without one."""
    if pending_request is None or not pending_request.args:
        return None
    first = pending_request.args[0]
    if isinstance(first, list) and first and isinstance(first[0], int):
        return first
    return None


class PrefixAffinityRouter(RequestRouter):
    """A Ray Serve request router for the engine deployment: `PrefixTable`'s choice over the live replicas, with
    queue lengths from Serve's cache (probed when unknown). Configured by `request_router_kwargs`: block_tokens,
    imbalance_threshold, max_prefixes."""

    def initialize_state(
        self,
        block_tokens: int = DEFAULT_BLOCK_TOKENS,
        imbalance_threshold: int = DEFAULT_IMBALANCE,
        max_prefixes: int = DEFAULT_MAX_PREFIXES,
        **_: Any,
    ) -> None:
        self.table = PrefixTable(block_tokens, imbalance_threshold, max_prefixes)
        # internal request id -> its keys, until routed (bounded: a call cancelled before routing never is)
        self._keys: OrderedDict[str, list[int]] = OrderedDict()

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        ids = prompt_ids(pending_request)
        keys = prefix_keys(ids, self.table.block_tokens) if ids is not None else []
        queues = await self._queue_lengths(candidate_replicas)
        if not queues:  # no replica answered: let Serve's backoff try again
            return [candidate_replicas]
        by_id = {r.replica_id: r for r in candidate_replicas}
        order, _ = self.table.choose(keys, queues)
        if keys and pending_request is not None:
            self._keys[pending_request.metadata.internal_request_id] = keys
            while len(self._keys) > MAX_PENDING_KEYS:
                self._keys.popitem(last=False)
        # one rank per replica: Serve tries the first and moves on only when its queue is full
        return [[by_id[rid]] for rid in order if rid in by_id]

    async def _queue_lengths(self, replicas: list[RunningReplica]) -> dict[Hashable, int]:
        queues: dict[Hashable, int] = {}
        unknown: list[RunningReplica] = []
        for r in replicas:
            n = self._replica_queue_len_cache.get(r.replica_id) if self._use_replica_queue_len_cache else None
            if n is None:
                unknown.append(r)
            else:
                queues[r.replica_id] = n
        if unknown:
            for r, n in await self._probe_queue_lens(unknown, 0):
                if n is not None:
                    queues[r.replica_id] = n
        return queues

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any) -> None:
        keys = self._keys.pop(pending_request.metadata.internal_request_id, None)
        if keys:
            self.table.assign(keys, replica_id, set(self._replica_id_set))

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self.table.drop(replica_id)

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        old = set(self._replica_id_set)
        super().update_replicas(replicas)
        for gone in old - set(self._replica_id_set):
            self.table.drop(gone)
