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
from tasc_ray.spec.config import DrafterConfig, DraftMode
from tasc_ray.spec.index import NgramIndex
from tasc_ray.spec.simulate import simulate_acceptance


@pytest.fixture(scope="module")
def outputs(task_rows) -> list[str]:
    return [r["output"] for r in task_rows]


def test_collision_entropy_known_values():
    assert collision_entropy(np.array([5, 5, 5, 5])) == pytest.approx(2.0)
    assert collision_entropy(np.array([7])) == 0.0
    assert collision_entropy(np.array([3, 1])) == pytest.approx(-math.log2(0.75**2 + 0.25**2))


# ----- the offline acceptance simulator -----


def test_simulate_known_answers():
    seq = list(range(10, 30))  # 20 distinct tokens
    index = NgramIndex.build([seq] * 3, max_order=4, top_k=4)
    corpus = DrafterConfig(mode=DraftMode.CORPUS, max_draft=4, min_path_prob=0.1)
    # Pass 1 has no history (nothing to draft) and yields 1 token; then every pass drafts 4 correct tokens and
    # yields 5: 1 + ceil(19 / 5) = 5 passes.
    r = simulate_acceptance(index, [seq], corpus)
    assert (r["tokens"], r["passes"], r["accepted"], r["drafted"]) == (20, 5, 16, 16)
    assert r["tokens_per_pass"] == pytest.approx(4.0) and r["acceptance_rate"] == 1.0
    assert r["mean_accepted_per_pass"] == pytest.approx(16 / 5)
    assert r["accepted_hist"] == [1, 0, 0, 0, 4]  # the last pass drafts the 4 tokens left, and ends the output
    # Tokens the corpus never saw: nothing is drafted, one token per pass.
    unseen = list(range(100, 120))
    r = simulate_acceptance(index, [unseen], corpus)
    assert (r["passes"], r["drafted"], r["tokens_per_pass"]) == (20, 0, 1.0)
    # A wrong corpus: drafts are rejected, every pass yields one token, acceptance is 0.
    wrong = NgramIndex.build([[t, t + 50] for t in seq], max_order=2, top_k=1)
    r = simulate_acceptance(wrong, [seq], DrafterConfig(mode=DraftMode.CORPUS, max_draft=2))
    assert r["passes"] == 20 and r["accepted"] == 0 and r["drafted"] > 0 and r["acceptance_rate"] == 0.0
    # Context mode learns from the prompt: the same answer as the corpus, and nothing without the prompt.
    context = DrafterConfig(mode=DraftMode.CONTEXT, max_draft=4)
    assert simulate_acceptance(None, [seq], context, prompts=[seq])["passes"] == 5
    assert simulate_acceptance(None, [seq], context)["passes"] == 20
    # Batching rows in lockstep gives the same totals as one row at a time.
    seqs = [seq, unseen, seq[:7], seq[5:]]
    together = simulate_acceptance(index, seqs, corpus, batch_size=64)
    alone = [simulate_acceptance(index, [s], corpus) for s in seqs]
    assert together["passes"] == sum(a["passes"] for a in alone)
    assert together["accepted"] == sum(a["accepted"] for a in alone)


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
