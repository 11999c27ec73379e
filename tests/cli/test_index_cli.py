"""The index commands' offline parts: collision entropy, and the acceptance simulator (library and `simulate`)."""

from __future__ import annotations

import json
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tasc_ray.cli.index import collision_entropy
from tasc_ray.cli.main import main
from tasc_ray.engine.config import DrafterConfig
from tasc_ray.engine.drafts.index import NgramIndex
from tasc_ray.engine.simulate import simulate_acceptance


@pytest.fixture(scope="module")
def outputs(task_rows) -> list[str]:
    return [r["output"] for r in task_rows]


def test_collision_entropy_known_values():
    assert collision_entropy(np.array([5, 5, 5, 5])) == pytest.approx(2.0)
    assert collision_entropy(np.array([7])) == 0.0
    assert collision_entropy(np.array([3, 1])) == pytest.approx(-math.log2(0.75**2 + 0.25**2))


def test_simulate_cli(outputs, tiny_model_dir, tiny_tokenizer, tmp_path, capsys):
    index = NgramIndex.from_texts(outputs[:300], tiny_tokenizer)
    index.save(str(tmp_path / "idx"))
    heldout = tmp_path / "heldout.parquet"
    pq.write_table(pa.table({"reference": outputs[300:] + [None], "prompt": ["p"] * 101}), heldout)
    args = [
        "simulate",
        "--index",
        str(tmp_path / "idx"),
        "--input",
        str(heldout),
        "--tokenizer",
        str(tiny_model_dir),
        "--json",
    ]
    assert main([*args, "--prompt-column", "prompt"]) == 0
    r = json.loads(capsys.readouterr().out)
    ids = tiny_tokenizer(outputs[300:], add_special_tokens=False)["input_ids"]
    assert r["sequences"] == 100 and r["skipped_rows"] == 1 and r["tokens"] == sum(len(s) for s in ids)
    # the CLI's answer is the library's
    lib = simulate_acceptance(
        index, ids, DrafterConfig(), tiny_tokenizer(["p"] * 100, add_special_tokens=False)["input_ids"]
    )
    assert r["passes"] == lib["passes"] and r["tokens_per_pass"] > 1.2  # a templated task drafts well
    assert main([*args, "--mode", "corpus", "--max-draft", "1"]) == 0
    assert json.loads(capsys.readouterr().out)["tokens_per_pass"] <= 2.0
    assert main([*args[:1], "--input", str(heldout), "--tokenizer", str(tiny_model_dir)]) == 2  # mixed needs --index
    assert main([*args[:-1], "--column", "missing"]) == 2
    assert "missing" in capsys.readouterr().err
