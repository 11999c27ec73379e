"""Generated sample tasks, so the demo runs anywhere; outputs vary little (fixed keys in a fixed order, values
copied from the input), the kind of task TASC targets:

- `orders` (the demo's): order messages -> one JSON object each, e.g. "Your order 4858 (4 x Wall Clock) to Dublin
  has been shipped." -> {"order": 4858, "item": "Wall Clock", "quantity": 4, "city": "Dublin"}. The bundled
  SmolLM2-135M gets 80-85% of these exactly right with three shots;
- `restaurants`: restaurant sentences -> slot strings (E2E-style MRs), harder for a 135M model (its exact match is
  under 20%: it misspells names and drops attributes).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

NAMES = [
    "The Golden Curry",
    "Blue Spice",
    "The Eagle",
    "Alimentum",
    "Zizzi",
    "The Phoenix",
    "Loch Fyne",
    "The Wrestlers",
    "Fitzbillies",
    "The Punter",
    "Cotto",
    "Green Man",
    "Aromi",
    "The Mill",
    "Browns Cambridge",
    "Strada",
    "The Rice Boat",
    "Giraffe",
    "Wildwood",
    "Midsummer House",
    "Clowns",
    "Bibimbap House",
]
EAT_TYPES = ["restaurant", "pub", "coffee shop"]
FOODS = ["Italian", "French", "Indian", "Chinese", "Japanese", "English", "Fast food"]
PRICES = ["cheap", "moderate", "high", "less than £20", "£20-25", "more than £30"]
AREAS = ["city centre", "riverside"]
TEMPLATES = [
    "{name} is a {food} {eatType} in the {area}.",
    "In the {area} there is a {priceRange} {food} {eatType} called {name}.",
    "{name} is a {priceRange} {eatType} serving {food} food near {near}.",
    "Located in the {area} near {near}, {name} is a {eatType} that serves {food} food.",
    "{name}, a {food} {eatType} in the {area}, is {family}.",
    "If you want {priceRange} {food} food, try {name}, a {eatType} near {near}.",
]
KEYS = ["name", "eatType", "food", "priceRange", "area", "familyFriendly", "near"]
INSTRUCTION = "Extract the restaurant's attributes from each sentence."


def _row(rng: random.Random) -> tuple[str, str]:
    template = rng.choice(TEMPLATES)
    values = {
        "name": rng.choice(NAMES),
        "eatType": rng.choice(EAT_TYPES),
        "food": rng.choice(FOODS),
        "priceRange": rng.choice(PRICES),
        "area": rng.choice(AREAS),
        "familyFriendly": rng.choice(["yes", "no"]),
        "near": rng.choice(NAMES),
    }
    family = "family-friendly" if values["familyFriendly"] == "yes" else "not family-friendly"
    text = template.format(family=family, **values)
    used = [k for k in KEYS if "{" + k + "}" in template or (k == "familyFriendly" and "{family}" in template)]
    mr = ", ".join(f"{k}[{values[k]}]" for k in used)
    return text, mr


def few_shot_prompt(text: str, shots: list[tuple[str, str]]) -> str:
    """A plain completion prompt (SmolLM2 keeps a few-shot format far better without the chat template)."""
    examples = "".join(f"Sentence: {s}\nMR: {mr}\n\n" for s, mr in shots)
    return f"{INSTRUCTION}\n\n{examples}Sentence: {text}\nMR:"


def sample_task(n: int, seed: int = 0, n_shots: int = 3) -> list[dict[str, str]]:
    """n rows of {"id", "text", "output", "prompt"}; the few-shot examples are drawn apart from the rows."""
    rng = random.Random(seed)
    shots = [_row(rng) for _ in range(n_shots)]
    rows = []
    for i in range(n):
        text, mr = _row(rng)
        rows.append({"id": f"row-{seed}-{i}", "text": text, "output": mr, "prompt": few_shot_prompt(text, shots)})
    return rows


ITEMS = [
    "Blue Widget", "Steel Bolt", "Garden Hose", "Desk Lamp", "Coffee Mug",
    "USB Cable", "Rain Jacket", "Yoga Mat", "Paper Towels", "Wall Clock",
]  # fmt: skip
CITIES = ["Paris", "Berlin", "Madrid", "Rome", "Lisbon", "Vienna", "Dublin", "Oslo", "Prague", "Warsaw"]
ORDER_TEMPLATES = [
    "Order {order}: {quantity} x {item}, destination {city}.",
    "Your order {order} ({quantity} x {item}) to {city} has been {status}.",
    "{quantity} x {item} for order {order}, shipping to {city}.",
]
ORDER_INSTRUCTION = "Convert each order message to JSON."


def _order(
    rng: random.Random, template: str | None = None, item: str | None = None, city: str | None = None
) -> tuple[str, str]:
    values = {
        "order": rng.randint(1000, 9999),
        "quantity": rng.randint(1, 9),
        "item": item or rng.choice(ITEMS),
        "city": city or rng.choice(CITIES),
        "status": rng.choice(["shipped", "delivered", "delayed"]),
    }
    text = (template or rng.choice(ORDER_TEMPLATES)).format(**values)
    fields = ("order", "item", "quantity", "city")
    return text, json.dumps({k: values[k] for k in fields})


def order_prompt(text: str, shots: list[tuple[str, str]]) -> str:
    examples = "".join(f"Input: {s}\nOutput: {out}\n\n" for s, out in shots)
    return f"{ORDER_INSTRUCTION}\n\n{examples}Input: {text}\nOutput:"


def order_task(n: int, seed: int = 0) -> list[dict[str, str]]:
    """n rows of {"id", "text", "output", "prompt"}; the three few-shot examples (one per message template, each
    with its own item and city, so that no value is the shots' majority to copy) are drawn apart from the rows."""
    rng = random.Random(seed)
    items, cities = rng.sample(ITEMS, len(ORDER_TEMPLATES)), rng.sample(CITIES, len(ORDER_TEMPLATES))
    shots = [_order(rng, *chosen) for chosen in zip(ORDER_TEMPLATES, items, cities)]  # no value repeated in the shots
    rows = []
    for i in range(n):
        text, out = _order(rng)
        rows.append({"id": f"order-{seed}-{i}", "text": text, "output": out, "prompt": order_prompt(text, shots)})
    return rows


TASKS = {"orders": order_task, "restaurants": sample_task}


def write_sample_task(
    out_dir: str | Path, n_corpus: int = 2000, n_prompts: int = 64, seed: int = 0, task: str = "orders"
) -> dict[str, Path]:
    """Write corpus.parquet (outputs to index) and prompts.parquet (disjoint rows to decode) of a task of TASKS
    under out_dir."""
    if task not in TASKS:
        raise ValueError(f"unknown sample task {task!r}; known: {', '.join(TASKS)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = TASKS[task](n_corpus + n_prompts, seed)
    corpus, prompts = rows[:n_corpus], rows[n_corpus:]
    paths = {"corpus": out_dir / "corpus.parquet", "prompts": out_dir / "prompts.parquet"}
    pq.write_table(pa.Table.from_pylist([{"id": r["id"], "output": r["output"]} for r in corpus]), paths["corpus"])
    pq.write_table(
        pa.Table.from_pylist(
            [{"id": r["id"], "text": r["text"], "prompt": r["prompt"], "reference": r["output"]} for r in prompts]
        ),
        paths["prompts"],
    )
    return paths
