"""Prefix-aware routing's policy (PrefixTable, no Ray) and its Serve config."""

from __future__ import annotations

import random

from tasc_ray.serving.config import PREFIX_ROUTER, ServeConfig
from tasc_ray.serving.routing import PrefixTable, prefix_keys


def _prompt(template: int, tail: int) -> list[int]:
    return [1000 * template + i for i in range(64)] + [7, tail, tail + 1]


def test_prefix_keys_name_whole_prefixes():
    a, b = _prompt(1, 5), _prompt(1, 9)
    assert prefix_keys(a, 16) == prefix_keys(b, 16) and len(prefix_keys(a, 16)) == 4  # 66 tokens: 4 whole blocks
    assert prefix_keys(_prompt(2, 5), 16)[0] != prefix_keys(a, 16)[0]
    assert prefix_keys(list(range(16)), 16) == []  # the last token is never part of a cached prefix


def test_templates_stick_to_one_replica_each_and_load_spills():
    table = PrefixTable(block_tokens=16, imbalance_threshold=2, rng=random.Random(0))
    queues = {"r1": 0, "r2": 0}
    first_a, why = table.choose(prefix_keys(_prompt(1, 0), 16), queues)
    assert why == "claimed"
    first_b, why = table.choose(prefix_keys(_prompt(2, 0), 16), queues)
    assert why == "claimed" and first_b[0] != first_a[0]  # the replica owning fewer prefixes among equals
    for tail in range(1, 6):
        assert table.choose(prefix_keys(_prompt(1, tail), 16), queues) == ([first_a[0], first_b[0]], "matched")
        assert table.choose(prefix_keys(_prompt(2, tail), 16), queues)[0][0] == first_b[0]
    # A's replica much busier than the other: power of two choices, the less loaded first
    busy = {first_a[0]: 5, first_b[0]: 1}
    order, why = table.choose(prefix_keys(_prompt(1, 9), 16), busy)
    assert why == "balanced" and order[0] == first_b[0]
    table.assign(prefix_keys(_prompt(1, 9), 16), first_b[0], set(busy))  # sent elsewhere: A keeps its owner
    assert table.choose(prefix_keys(_prompt(1, 3), 16), queues)[0][0] == first_a[0]
    # a dead replica's prefixes go to the next replica that serves them
    table.drop(first_a[0])
    order, why = table.choose(prefix_keys(_prompt(1, 3), 16), {first_b[0]: 0, "r3": 0})
    assert why == "claimed" and order[0] == "r3"  # r3 owns fewer prefixes than B's replica
    assert table.choose([], queues)[1] == "no_prompt"


def test_table_is_bounded():
    table = PrefixTable(block_tokens=4, max_prefixes=10)
    for t in range(20):
        table.assign(prefix_keys(list(range(t * 100, t * 100 + 9)), 4), f"r{t % 2}")
    assert len(table.owner) == 10 and sum(table.owned.values()) == 10


def test_request_router_option():
    opts = ServeConfig(model="m", request_router="prefix_affinity").deployment_options()
    router = opts["request_router_config"]
    assert router["request_router_class"] == PREFIX_ROUTER
    assert router["request_router_kwargs"] == {"block_tokens": 16, "imbalance_threshold": 8}
    plain = ServeConfig(model="m").deployment_options()  # the default: Serve's own router
    assert "request_router_config" not in plain
