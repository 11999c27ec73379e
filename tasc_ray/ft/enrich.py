"""TASC-ft vocabulary enrichment: add frequent output n-grams to a tokenizer as ordinary added tokens.

Each iteration tokenises the training outputs with the current vocabulary, counts every token n-gram
(n = 2..N, vectorised with `hash_windows`), scores each by frequency x (n - 1) (the tokens it would save),
drops invalid and conflicting candidates, and adds the best M as `AddedToken(s, normalized=False)`. The next
iteration re-tokenises with the enlarged vocabulary, so new tokens can build on earlier ones. It stops when
the budget is spent or when an iteration's measured gain falls below `min_gain`.

Added tokens are matched greedily (leftmost-longest) in the *raw* text before the BPE model runs, so a new
token can fire in places where the current tokenisation does not align with it (inside a longer word, or
straddling a token boundary) and change how the neighbouring text is tokenised. Two rules handle that:

* **Prefix-conflict score.** For a candidate with decoded string s, let ``c(s)`` be the number of
  (non-overlapping) occurrences of s as a substring of the training outputs, and ``f(s)`` the number of
  *aligned* occurrences: the count of token n-grams (summed over every tokenisation that decodes to s) in the
  current tokenisation. The misaligned occurrences ``m(s) = max(0, c(s) - f(s))`` are the places where the
  greedy added-token match would cut into a longer continuation that s is merely a prefix of (``"The"`` in
  ``"Theatre"``, ``"food[Fast"`` in ``"food[Fast food]"`` split differently). The prefix-conflict score is
  ``conflict(s) = m(s) / c(s)`` in [0, 1]; with the filter on, candidates with ``conflict(s) > max_conflict``
  (default 0.1) are dropped. The bench measures compression with and without it.
* **Field boundaries** (`no_cross`, off by default). A task's outputs often separate fields with a fixed string
  (`", "` between E2E slots). A candidate *crosses* a separator when the separator occurs strictly inside it, with
  text on both sides (`"], food[English"` crosses `", "`; `", food[English]"` does not): such a token decides
  two fields at once (one value and the next field), which the fine-tuned model must then learn from the few
  times each combination occurs. With `no_cross=(", ",)` those candidates are dropped, so each new token stays
  within one field (separator first, if at all).
* **Field names** (`key_end`, off by default). A string that ends a field's name (`"["` in E2E's `food[English]`):
  a candidate may end with it but not go on past it (`" food["` is kept; `" food[English],"` and
  `"[English],"` are not), so a field's name and its value are never one token. Without it a frequent pair of a
  name and a value becomes one token and the name is never emitted alone: a value the training data lacks (the
  E2E test set's `eatType[pub]`, against the devset's `eatType[coffee shop]` alone) has no token path the
  fine-tuned model has practised. With it, every value, seen or not, follows its name's token.
* **Copied values** (`max_copied`, off by default; needs the rows' prompts). A candidate is a *copied value*
  when, in more than `max_copied` of the training rows whose output contains it, one of its word pieces (a run of
  2+ word characters) also occurs in the row's prompt: it carries (part of) a value the model copies from the input
  (`" near Burger King"` from `near[Burger King]`, `"name[The Eagle]"` from a sentence naming The Eagle). Such a
  token bakes the training data's values into the vocabulary: an input with a value the training data lacks
  must then be copied through original tokens, a path the fine-tuned model has rarely seen. With the filter on,
  values stay spelled in original tokens (copyable) and new tokens carry the task's fixed text. A field's name
  (a candidate ending with a `key_end` string, `" near["`) is never a copied value: prompts often say the name
  ("near", "customer rating") beside the value, and the name is the task's fixed text.
* **Batch overlap.** Within one iteration a candidate is skipped when a suffix of its token sequence equals a
  prefix of an already chosen one (or vice versa), or when one contains the other: both cannot replace the
  same text, so their counted savings would be double-counted. They are reconsidered next iteration.

Candidates must decode to valid text that round-trips: no U+FFFD, and the tokenizer's decoder must give the
string back for the token alone (byte-level decoders map some non-ASCII added tokens to wrong bytes, so
e.g. ``"£20"`` is refused while ``" £20"`` is fine). Real compression is always measured by re-tokenising,
and ``decode(encode(s)) == s`` is checked over the whole corpus before anything is written.

The steps are separate functions: `find_candidates` (top n-grams decoded; crossing, in-vocabulary and
non-round-tripping strings dropped), `choose_candidates` (prefix-conflict filter, batch overlap) and
`enrichment_loop` (add, measure, stop); `enrich_tokenizer` runs them on a copy of the tokenizer.

`enrich_model` resizes the model's embeddings; each new row (and LM-head row when untied) is the mean of the
rows of its constituent *original* tokens, and the result is saved as a plain Hugging Face directory. With
`untie=True` a model whose LM head is its input embedding gets its own copy of the matrix first, so that a new
token's input row (how the model reads it) and output row (when the model emits it) can learn apart.
"""

from __future__ import annotations

import copy
import json
import logging
import random
import re
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tokenizers import AddedToken
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from tasc_ray.engine.drafts.index import hash_windows, tokenize_texts
from tasc_ray.io import atomic_directory, is_free_directory

logger = logging.getLogger(__name__)

REPORT_FILE = "tasc_ft_vocab.json"


# A new token must be seen often enough in the training outputs for fine-tuning to learn it, as an output and as
# context. Measured on E2E MR -> text (256 rows, the same fine-tuning; benchmarks/results/ft_ablation): min-count 10
# keeps 67 of 139 tokens and 32.2% of the 39.5% compression, and the held-out references' cost under the TASC-ft model
# falls from +6.4 to +3.7 nats above the original vocabulary's (+10.2 -> +7.6 on the E2E test set). Decoded, the
# held-out BLEU gap went from -14.4 to -12.7 and chrF from -10.4 to -11.5: one run of 48 prompts, within its noise.
DEFAULT_MIN_COUNT = 10


class VocabEnrichmentError(ValueError):
    """Bad input for enrichment: empty corpus, a budget of 0, a model directory without a tokenizer, ..."""


@dataclass
class EnrichConfig:
    """Knobs of the enrichment loop."""

    budget: int = 500  # most new tokens in all
    max_n: int = 8  # longest token n-gram considered per iteration
    per_iteration: int = 50  # new tokens added per iteration (M)
    min_count: int = DEFAULT_MIN_COUNT  # an n-gram must occur at least this often
    min_gain: float = 0.002  # stop when an iteration saves less than this share of the corpus' tokens
    prefix_filter: bool = True
    max_conflict: float = 0.1  # drop candidates whose prefix-conflict score exceeds this
    holdout: float = 0.1  # share of the corpus held out to measure compression
    seed: int = 0
    candidate_pool: int = 20  # candidates examined per iteration = candidate_pool * per_iteration
    no_cross: tuple[str, ...] = ()  # field separators a new token may not cross (see the module docstring)
    key_end: tuple[str, ...] = ()  # strings ending a field's name: a new token may end with one, not go on past it
    max_copied: float = 1.0  # drop candidates copied from the prompt in more than this share of their rows (1: off)

    def validate(self) -> None:
        if self.budget <= 0:
            raise VocabEnrichmentError(f"budget must be positive, got {self.budget}")
        if self.max_n < 2:
            raise VocabEnrichmentError(f"max_n must be >= 2, got {self.max_n}")
        if self.per_iteration <= 0:
            raise VocabEnrichmentError(f"per_iteration must be positive, got {self.per_iteration}")
        if not 0.0 <= self.holdout < 1.0:
            raise VocabEnrichmentError(f"holdout must be in [0, 1), got {self.holdout}")
        if not 0.0 <= self.max_conflict <= 1.0:
            raise VocabEnrichmentError(f"max_conflict must be in [0, 1], got {self.max_conflict}")
        if not 0.0 <= self.max_copied <= 1.0:
            raise VocabEnrichmentError(f"max_copied must be in [0, 1], got {self.max_copied}")
        if any(not sep for sep in self.no_cross):
            raise VocabEnrichmentError("no_cross separators must be non-empty strings")
        if any(not end for end in self.key_end):
            raise VocabEnrichmentError("key_end strings must be non-empty")


@dataclass
class NewToken:
    """One added token, in the order added."""

    token: str
    id: int
    iteration: int
    n: int  # current-vocabulary tokens it merged when chosen
    count: int  # aligned occurrences f(s) when chosen
    score: int  # count * (n - 1): tokens saved as counted
    conflict: float  # prefix-conflict score m(s) / c(s)
    base_ids: list[int]  # its tokenisation under the original vocabulary (embedding init)


@dataclass
class IterationLog:
    iteration: int
    added: int
    train_tokens: int  # training outputs' total tokens after this iteration
    gain: float  # relative reduction of train_tokens by this iteration
    candidates: int
    dropped_invalid: int
    dropped_conflict: int
    dropped_overlap: int
    seconds: float
    dropped_crossing: int = 0
    dropped_copied: int = 0


@dataclass
class EnrichResult:
    tokenizer: PreTrainedTokenizerBase
    new_tokens: list[NewToken]
    iterations: list[IterationLog]
    stop_reason: str
    config: EnrichConfig
    train_size: int
    heldout_size: int
    tokens_per_output: dict[str, dict[str, float]] = field(default_factory=dict)

    def report(self) -> dict[str, Any]:
        return {
            "config": asdict(self.config),
            "new_tokens": [asdict(t) for t in self.new_tokens],
            "n_new_tokens": len(self.new_tokens),
            "iterations": [asdict(it) for it in self.iterations],
            "stop_reason": self.stop_reason,
            "train_outputs": self.train_size,
            "heldout_outputs": self.heldout_size,
            "tokens_per_output": self.tokens_per_output,
        }


def split_corpus(texts: Sequence[str], holdout: float, seed: int = 0) -> tuple[list[str], list[str]]:
    """A deterministic (train, held-out) split by *distinct* text, so a held-out output never also occurs in the
    training part (E2E repeats each MR about 8 times). Held-out is empty when holdout is 0 or the corpus is tiny."""
    distinct = sorted(set(texts))
    random.Random(seed).shuffle(distinct)
    n_held = int(round(len(distinct) * holdout)) if len(distinct) >= 10 else 0
    held_set = set(distinct[:n_held])
    return [t for t in texts if t not in held_set], [t for t in texts if t in held_set]


def count_tokens(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str]) -> int:
    """Total tokens of the texts (no special tokens), by actually tokenising them."""
    return int(sum(len(s) for s in tokenize_texts(texts, tokenizer)))


def roundtrip_failures(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], limit: int = 5) -> list[str]:
    """Texts (up to `limit`) for which decode(encode(text)) != text."""
    bad = []
    for text, ids in zip(texts, tokenize_texts(texts, tokenizer)):
        if tokenizer.decode(ids.tolist(), skip_special_tokens=False, clean_up_tokenization_spaces=False) != text:
            bad.append(text)
            if len(bad) >= limit:
                break
    return bad


def _special_ids(tokenizer: PreTrainedTokenizerBase) -> np.ndarray:
    return np.array(sorted(set(tokenizer.all_special_ids)), dtype=np.int64)


def _candidates(
    seqs: list[np.ndarray], max_n: int, min_count: int, special: np.ndarray, pool: int
) -> list[tuple[int, int, tuple[int, ...]]]:
    """The `pool` best (score, count, ids) token n-grams, n = 2..max_n, scored count * (n - 1)."""
    if not seqs:
        return []
    flat = np.concatenate([np.append(s.astype(np.int64), -1) for s in seqs])
    flat_ok = (flat >= 0) & ~np.isin(flat, special)
    out: list[tuple[int, int, tuple[int, ...]]] = []
    for n in range(2, max_n + 1):
        if len(flat) < n:
            break
        windows = np.lib.stride_tricks.sliding_window_view(flat, n)
        ok = np.lib.stride_tricks.sliding_window_view(flat_ok, n).all(axis=1)
        windows = windows[ok]
        if len(windows) == 0:
            break
        _, first, counts = np.unique(hash_windows(windows), return_index=True, return_counts=True)
        keep = counts >= min_count
        if not keep.any():
            break  # longer n-grams cannot be more frequent
        first, counts = first[keep], counts[keep]
        top = np.argsort(-counts, kind="stable")[:pool]
        out.extend(
            (int(c) * (n - 1), int(c), tuple(int(t) for t in windows[i])) for i, c in zip(first[top], counts[top])
        )
    out.sort(key=lambda x: -x[0])
    return out[: pool * 4]


def _overlaps(a: tuple[int, ...], b: tuple[int, ...]) -> bool:
    """True when a and b can compete for the same text: containment, or a suffix of one is a prefix of the other."""
    if len(a) > len(b):
        a, b = b, a
    if any(b[i : i + len(a)] == a for i in range(len(b) - len(a) + 1)):
        return True
    for k in range(1, len(a)):
        if a[-k:] == b[:k] or b[-k:] == a[:k]:
            return True
    return False


def crosses(s: str, separator: str) -> bool:
    """Whether `separator` occurs strictly inside s, with text on both sides (s spans two fields)."""
    return separator in s[1:-1]


def goes_past(s: str, key_end: str) -> bool:
    """Whether text follows an occurrence of `key_end` in s (s holds a field name's end and some of its value)."""
    i = s.find(key_end)  # the first occurrence: text follows some occurrence iff it follows this one
    return i != -1 and i + len(key_end) < len(s)


def is_field_name(s: str, key_ends: Sequence[str]) -> bool:
    """Whether s ends a field's name (`" near["`): the copied-value filter spares it, since a prompt that names a
    field's value often says the field's name too ("near", "customer rating") without the name being a value."""
    return any(s.endswith(end) for end in key_ends)


def _round_trips(tokenizer: PreTrainedTokenizerBase, s: str, probe: tuple[list[str], str] | None = None) -> bool:
    """Whether an added token with content s decodes back to s, alone and between ordinary tokens.

    The backend decoder sees an added token's content as its token string. Some decoders mangle it: a byte-level
    decoder maps non-ASCII characters to wrong bytes, and a `Fuse` step (seen in GGUF-converted tokenizers)
    merges neighbours into one string before the byte-level step, which then fails for the whole run.
    `probe` is (token strings, their decoded text) of ordinary tokens to put on both sides."""
    if not s or "\ufffd" in s:
        return False
    backend = getattr(tokenizer, "backend_tokenizer", None)
    decoder = backend.decoder if backend is not None else None
    if decoder is None:
        return True
    if decoder.decode([s]) != s:
        return False
    if probe is not None:
        toks, text = probe
        return decoder.decode([*toks, s, *toks]) == text + s + text
    return True


def _probe(tokenizer: PreTrainedTokenizerBase) -> tuple[list[str], str]:
    ids = tokenizer(" a1", add_special_tokens=False)["input_ids"]
    return tokenizer.convert_ids_to_tokens(ids), tokenizer.decode(ids, clean_up_tokenization_spaces=False)


@dataclass
class Candidate:
    """A string the iteration may add as a token: its current tokenisation(s) merged, and how it scores."""

    token: str
    score: int  # count * (n - 1), summed over the tokenisations that decode to `token`
    count: int  # aligned occurrences f(s)
    ids: tuple[int, ...]  # its first-found tokenisation under the current vocabulary
    conflict: float = 0.0  # prefix-conflict score m(s) / c(s), set by choose_candidates


@dataclass
class Drops:
    """Candidates left out in one iteration, by reason."""

    invalid: int = 0
    crossing: int = 0
    conflict: int = 0
    overlap: int = 0
    copied: int = 0


WORD_PIECE = re.compile(r"\w{2,}")


class CopiedValues:
    """How often a string of the outputs is copied from the prompt: the share of the rows whose output contains it
    where one of its word pieces (2+ word characters) also occurs in the row's prompt (see the module docstring).
    Pieces, not whole words: a candidate that cuts a value (`"restlers],"` of `name[The Wrestlers]`) is a copied
    value too."""

    def __init__(self, outputs: Sequence[str], prompts: Sequence[str]) -> None:
        if len(outputs) != len(prompts):
            raise VocabEnrichmentError(f"{len(outputs)} outputs but {len(prompts)} prompts")
        self.rows = list(zip(outputs, prompts))
        self._cache: dict[str, float] = {}

    def share(self, s: str) -> float:
        if s not in self._cache:
            words = WORD_PIECE.findall(s)
            hits = [any(w in prompt for w in words) for out, prompt in self.rows if s in out]
            self._cache[s] = sum(hits) / len(hits) if hits and words else 0.0
        return self._cache[s]


def find_candidates(
    tok: PreTrainedTokenizerBase,
    seqs: list[np.ndarray],
    config: EnrichConfig,
    want: int,
    vocab: set[str],
    probe: tuple[list[str], str],
    drops: Drops,
) -> tuple[list[Candidate], int]:
    """The iteration's candidates, best first: the top n-grams decoded, those crossing a field separator, already
    in the vocabulary or not round-tripping dropped, tokenisations of one string merged. Also the raw count."""
    raw = _candidates(seqs, config.max_n, config.min_count, _special_ids(tok), config.candidate_pool * want)
    by_string: dict[str, Candidate] = {}
    for score, count, ids in raw:
        s = tok.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)
        if any(crosses(s, sep) for sep in config.no_cross) or any(goes_past(s, end) for end in config.key_end):
            drops.crossing += 1  # the cheap tests first
            continue
        if s in vocab or not _round_trips(tok, s, probe):
            drops.invalid += 1
            continue
        entry = by_string.setdefault(s, Candidate(s, 0, 0, ids))
        entry.score += score
        entry.count += count
    return sorted(by_string.values(), key=lambda c: -c.score), len(raw)


def choose_candidates(
    ranked: list[Candidate],
    joined: str,
    config: EnrichConfig,
    want: int,
    drops: Drops,
    copied: CopiedValues | None = None,
) -> list[Candidate]:
    """Up to `want` candidates in rank order, leaving out prefix-conflicting ones (when the filter is on), copied
    values (with `copied` and max_copied < 1) and those overlapping an already chosen one."""
    chosen: list[Candidate] = []
    for c in ranked:
        if len(chosen) >= want:
            break
        occurrences = joined.count(c.token)
        c.conflict = max(0, occurrences - c.count) / occurrences if occurrences else 1.0
        if config.prefix_filter and c.conflict > config.max_conflict:
            drops.conflict += 1
            continue
        if copied is not None and config.max_copied < 1.0 and not is_field_name(c.token, config.key_end):
            if copied.share(c.token) > config.max_copied:
                drops.copied += 1
                continue
        if any(_overlaps(c.ids, other.ids) for other in chosen):
            drops.overlap += 1
            continue
        chosen.append(c)
    return chosen


def _added(
    tok: PreTrainedTokenizerBase, base: PreTrainedTokenizerBase, chosen: list[Candidate], iteration: int
) -> list[NewToken]:
    return [
        NewToken(
            token=c.token,
            id=int(tok.convert_tokens_to_ids(c.token)),
            iteration=iteration,
            n=len(c.ids),
            count=c.count,
            score=c.score,
            conflict=round(c.conflict, 4),
            base_ids=base(c.token, add_special_tokens=False)["input_ids"],
        )
        for c in chosen
    ]


def _iteration_log(
    iteration: int, added: int, before: int, after: int, candidates: int, drops: Drops, t0: float
) -> IterationLog:
    gain = (before - after) / before
    logger.info("iteration %d: +%d tokens, train tokens %d -> %d (%.2f%%)", iteration, added, before, after, 100 * gain)
    return IterationLog(
        iteration=iteration,
        added=added,
        train_tokens=after,
        gain=round(gain, 5),
        candidates=candidates,
        dropped_invalid=drops.invalid,
        dropped_conflict=drops.conflict,
        dropped_overlap=drops.overlap,
        seconds=round(time.perf_counter() - t0, 3),
        dropped_crossing=drops.crossing,
        dropped_copied=drops.copied,
    )


@dataclass
class EnrichLoopResult:
    """The enlarged tokenizer, the tokens added in order, one log per iteration, and why the loop stopped."""

    tokenizer: PreTrainedTokenizerBase
    new_tokens: list[NewToken]
    iterations: list[IterationLog]
    stop_reason: str


def enrichment_loop(
    base: PreTrainedTokenizerBase,
    train: list[str],
    config: EnrichConfig,
    progress: bool = True,
    copied: CopiedValues | None = None,
) -> EnrichLoopResult:
    """Add tokens iteration by iteration until the budget is spent, no candidate is left, or the gain is too small."""
    tok = copy.deepcopy(base)
    joined, vocab, probe = "\x00".join(train), set(tok.get_vocab()), _probe(tok)
    out = EnrichLoopResult(tok, [], [], "budget")
    current = count_tokens(tok, train)
    bar = tqdm(total=config.budget, desc="enrich-vocab", unit="tok", disable=not progress)
    iteration = 0
    while len(out.new_tokens) < config.budget:
        iteration += 1
        t0, drops = time.perf_counter(), Drops()
        want = min(config.per_iteration, config.budget - len(out.new_tokens))
        seqs = tokenize_texts(train, out.tokenizer)
        ranked, n_raw = find_candidates(out.tokenizer, seqs, config, want, vocab, probe, drops)
        chosen = choose_candidates(ranked, joined, config, want, drops, copied)
        if not chosen:
            out.stop_reason = "no candidates"
            break
        trial = copy.deepcopy(out.tokenizer)
        trial.add_tokens([AddedToken(c.token, normalized=False, special=False) for c in chosen])
        after = count_tokens(trial, train)
        if after >= current:
            out.stop_reason = f"no gain (iteration {iteration} would change tokens {current} -> {after}; not added)"
            break
        gain = (current - after) / current
        out.tokenizer = trial
        vocab.update(c.token for c in chosen)
        out.new_tokens += _added(trial, base, chosen, iteration)
        out.iterations.append(_iteration_log(iteration, len(chosen), current, after, n_raw, drops, t0))
        bar.update(len(chosen))
        current = after
        if gain < config.min_gain:
            out.stop_reason = f"marginal gain {gain:.4f} < min_gain {config.min_gain}"
            break
    bar.close()
    return out


def _copied_values(
    texts: Sequence[str], prompts: Sequence[str] | None, train: list[str], config: EnrichConfig
) -> CopiedValues | None:
    """The copied-value statistics of the training outputs, when the filter is on (it needs the prompts)."""
    if config.max_copied >= 1.0:
        return None
    if prompts is None:
        raise VocabEnrichmentError("max_copied < 1 needs the rows' prompts (e.g. enrich-vocab --prompt-column)")
    if len(prompts) != len(texts):
        raise VocabEnrichmentError(f"{len(texts)} outputs but {len(prompts)} prompts")
    keep = set(train)
    pairs = [(t, p) for t, p in zip(texts, prompts) if isinstance(t, str) and t and t in keep]
    return CopiedValues([t for t, _ in pairs], [p if isinstance(p, str) else "" for _, p in pairs])


def enrich_tokenizer(
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    config: EnrichConfig | None = None,
    progress: bool = True,
    prompts: Sequence[str] | None = None,
) -> EnrichResult:
    """Run the enrichment loop on a copy of `tokenizer` over the outputs `texts` (and their rows' `prompts`, which
    the copied-value filter reads); the input is left unchanged."""
    config = config or EnrichConfig()
    config.validate()
    all_texts = list(texts)
    texts = [t for t in all_texts if isinstance(t, str) and t]
    if not texts:
        raise VocabEnrichmentError("the corpus has no non-empty outputs (empty corpus)")
    if not getattr(tokenizer, "is_fast", False):
        raise VocabEnrichmentError("vocabulary enrichment needs a fast (tokenizers-backed) tokenizer")
    train, held = split_corpus(texts, config.holdout, config.seed)
    copied = _copied_values(all_texts, prompts, train, config)
    loop = enrichment_loop(tokenizer, train, config, progress, copied)
    bad = roundtrip_failures(loop.tokenizer, texts)
    if bad:
        raise VocabEnrichmentError(f"decode(encode(s)) != s for {len(bad)}+ corpus texts, e.g. {bad[0]!r}")
    result = EnrichResult(
        loop.tokenizer, loop.new_tokens, loop.iterations, loop.stop_reason, config, len(train), len(held)
    )
    for name, split in (("train", train), ("heldout", held)):
        if split:
            b, a = count_tokens(tokenizer, split) / len(split), count_tokens(loop.tokenizer, split) / len(split)
            result.tokens_per_output[name] = {
                "before": round(b, 3),
                "after": round(a, 3),
                "reduction": round(1 - a / b, 4) if b else 0.0,
            }
    return result


def untie_embeddings(model: PreTrainedModel) -> bool:
    """Give a tied LM head its own copy of the input embedding matrix (same values, so the same model); True if it
    was tied. The copy costs vocabulary x hidden parameters (28M, +21%, for SmolLM2-135M) and no decoding work."""
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    if head is None or head.weight.data_ptr() != emb.weight.data_ptr():
        return False
    head.weight = torch.nn.Parameter(emb.weight.detach().clone())
    model.config.tie_word_embeddings = False
    if getattr(model.config, "text_config", None) is not None:
        model.config.text_config.tie_word_embeddings = False
    return True


def init_new_embeddings(
    model: PreTrainedModel, new_tokens: Sequence[NewToken], old_vocab_size: int, untie: bool = False
) -> None:
    """Resize the model to hold the new tokens (untying the LM head first if asked); each new row = mean of its
    original constituent tokens' rows."""
    if not new_tokens:
        return
    new_size = max(old_vocab_size, max(t.id for t in new_tokens) + 1)
    model.resize_token_embeddings(new_size, mean_resizing=False)
    if untie:
        untie_embeddings(model)
    emb = model.get_input_embeddings().weight
    out = model.get_output_embeddings()
    untied = out is not None and out.weight.data_ptr() != emb.data_ptr()
    with torch.no_grad():
        for t in new_tokens:
            idx = torch.tensor(t.base_ids, dtype=torch.long, device=emb.device)
            emb[t.id] = emb[idx].mean(dim=0)
            if untied:
                out.weight[t.id] = out.weight[idx].mean(dim=0)
                if getattr(out, "bias", None) is not None:
                    out.bias[t.id] = out.bias[idx].mean()


def _load_base(model: str) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, str]:
    from transformers import AutoModelForCausalLM

    from tasc_ray.models import ModelNotFoundError, load_tokenizer, resolve_model

    source = resolve_model(model)
    try:
        tokenizer = load_tokenizer(source)
    except ModelNotFoundError as exc:
        raise VocabEnrichmentError(f"{model}: cannot load a tokenizer ({exc})") from exc
    model_obj = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    return model_obj, tokenizer, source


def enrich_model(
    model: str,
    texts: Sequence[str],
    out: str | Path,
    config: EnrichConfig | None = None,
    progress: bool = True,
    prompts: Sequence[str] | None = None,
    untie: bool = False,
) -> dict[str, Any]:
    """Enrich `model`'s tokenizer on `texts`, init the new rows (on an untied LM head with `untie`), save a plain HF
    directory to `out`, written aside and moved into place (`tasc_ray.io.atomic_directory`). Returns the report
    (also saved as `out/tasc_ft_vocab.json`)."""
    config = config or EnrichConfig()
    config.validate()
    if not [t for t in texts if isinstance(t, str) and t]:
        raise VocabEnrichmentError("the corpus has no non-empty outputs (empty corpus)")
    if not is_free_directory(out):
        raise VocabEnrichmentError(f"output directory {out} exists and is not empty")
    t0 = time.perf_counter()
    model_obj, tokenizer, source = _load_base(model)
    old_size = model_obj.get_input_embeddings().weight.shape[0]
    result = enrich_tokenizer(tokenizer, texts, config, progress, prompts)
    init_new_embeddings(model_obj, result.new_tokens, old_size, untie)
    report = result.report()
    report.update(
        {
            "base_model": model,
            "base_path": source,
            "vocab_size_before": len(tokenizer),
            "vocab_size_after": len(result.tokenizer),
            "untied_embeddings": not model_obj.config.tie_word_embeddings,
            "seconds": round(time.perf_counter() - t0, 2),
        }
    )
    with atomic_directory(out, last=REPORT_FILE) as tmp:
        model_obj.save_pretrained(tmp)
        result.tokenizer.save_pretrained(tmp)
        (tmp / REPORT_FILE).write_text(json.dumps(report, indent=2, ensure_ascii=False))
    logger.info(
        "added %d tokens (%s); held-out tokens/output %s -> saved %s",
        len(result.new_tokens),
        result.stop_reason,
        report["tokens_per_output"].get("heldout"),
        out,
    )
    return report
