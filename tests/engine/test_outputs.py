"""Where outputs end: EOS and stop strings found in the decoded text."""

from __future__ import annotations

from tasc_ray.engine.outputs import cut_at_eos, find_stop


def test_cut_at_eos_keeps_the_eos_token():
    assert cut_at_eos([4, 5, 2, 6], {2}) == ([4, 5, 2], True)
    assert cut_at_eos([4, 5], {2}) == ([4, 5], False)


def test_find_stop_names_the_token_and_the_text_position(tiny_tokenizer):
    ids = tiny_tokenizer("name[Zizzi], food[Italian]", add_special_tokens=False)["input_ids"]
    text = tiny_tokenizer.decode(ids, skip_special_tokens=True)
    end, where = find_stop(tiny_tokenizer, ids, [","])
    assert where == text.index(",")
    assert "," in tiny_tokenizer.decode(ids[:end]) and "," not in tiny_tokenizer.decode(ids[: end - 1])
    assert find_stop(tiny_tokenizer, ids, ["nowhere"]) is None
    assert find_stop(tiny_tokenizer, ids, [","], start=end - 1) == (end, where)  # earlier ends were checked before
