"""Choosing a TASC-ft recipe for a task from its outputs (and prompts): `choose_recipe`.

    choice = choose_recipe(outputs, prompts, metric="slot_f1", bound=1.0, model="smollm2-135m")
    print(choice.table())          # every candidate: tokens saved, predicted quality delta, chosen/rejected, why
    choice.chosen                  # a Recipe (its EnrichConfig and --flags), or None: keep the original vocabulary

The candidates are the recipes the repo has (docs/tasc_ft.md, "Which recipe"): plain enrichment (`default`),
field names apart from values (`key-end`, with the field syntax detected in the outputs, and `key-end-copied`, which
also keeps values copied from the prompt out of the new tokens), and training on a task model's own outputs
(`distill`, for free text), each at two sizes (the budget, and a quarter of the tokens the full size added). The
probes run cheapest first, each on the candidates the previous one left:

1. **Vocabulary statistics** (seconds, no model): each candidate enriches the tokenizer on the training part of the
   outputs (`probe_rows` distinct outputs are held out); its compression on the held-out outputs (the tokens it
   saves there, re-tokenised), the share of its new tokens that cross a field boundary (and of those that hold a
   field's name and some of its value), the share carrying a value copied from the prompt, and how much better it
   compresses the training outputs than the held-out ones (tokens fitted to the training set's values). A candidate
   that adds no token or saves less than `min_reduction` is rejected; the others are marked *risky* or not by these
   statistics.
2. **Likelihood** (a pilot fine-tune each, `pilot_steps` steps): the original vocabulary and each candidate are
   fine-tuned alike for a few dozen steps on the same rows, then read the held-out rows with teacher forcing: the
   held-out outputs' cost in nats (prompt given, output and EOS as each tokenizer tokenises it) and the
   teacher-forced predictions (the argmax at every output position), which the task's metric scores against the
   outputs. The candidate's score minus the original's is its predicted quality delta, in the metric's points. For
   exact match this is exact: greedy decoding reproduces an output iff every teacher-forced argmax is right.
3. **Pilot decoding**, only where the two probes disagree (risky by the statistics yet predicted within the bound,
   or not risky yet predicted outside it): both pilot models decode the held-out prompts greedily and the metric's
   delta on those outputs replaces the prediction.

The choice is the candidate with the most compression whose predicted delta is no more than `bound` points below
the original's. When none qualifies, or the corpus is too small or too varied for any n-gram to reach `min_count`,
the choice is None and `message` says why: keep the original vocabulary (TASC-spec still applies).
"""

from __future__ import annotations

import copy
import logging
import random
import re
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from tasc_ray.ft.enrich import (
    CopiedValues,
    EnrichConfig,
    NewToken,
    VocabEnrichmentError,
    count_tokens,
    crosses,
    enrich_tokenizer,
    goes_past,
    init_new_embeddings,
    is_field_name,
)
from tasc_ray.metrics import METRICS, score

logger = logging.getLogger(__name__)

RECIPE_FILE = "recipe.json"
KINDS = ("default", "key-end", "key-end-copied", "distill")
# Strings that end a field's name, tried in this order, with the separator between fields that goes with each.
FIELD_SYNTAXES: tuple[tuple[str, str], ...] = (("[", ", "), ('":', ", "), ("=", ", "), (": ", "\n"))
FIELD_SHARE = 0.5  # field syntax: at least this share of the outputs has two or more `name<end>` fields
RISKY_CROSSING = 0.25  # a vocabulary whose new tokens join a field's name to its value this often is risky
RISKY_COPIED = 0.5  # ... or carry a value copied from the prompt this often
RISKY_FIT_GAP = 0.15  # ... or compress the training outputs this much (absolute share) better than held-out ones


class RecipeError(ValueError):
    """Bad input to the recipe choice: no outputs, prompts that do not match them, an unknown metric."""


@dataclass(frozen=True)
class Recipe:
    """One TASC-ft recipe: how to enrich (`EnrichConfig` overrides) and whether to train on a teacher's outputs."""

    kind: str  # one of KINDS
    budget: int  # most new tokens
    key_end: tuple[str, ...] = ()
    max_copied: float = 1.0
    distill: bool = False

    @property
    def name(self) -> str:
        return f"{self.kind}-{self.budget}"

    def enrich_config(self, base: EnrichConfig | None = None) -> EnrichConfig:
        """`base` (default EnrichConfig()) with this recipe's budget, field names and copied-value filter."""
        base = base or EnrichConfig()
        return replace(
            base,
            budget=self.budget,
            per_iteration=min(base.per_iteration, self.budget),
            key_end=self.key_end,
            max_copied=self.max_copied,
        )

    def flags(self) -> list[str]:
        """The `enrich-vocab` / `bench ft` flags of this recipe (and `--distill`, which `bench ft` has)."""
        out = ["--budget", str(self.budget)]
        for end in self.key_end:
            out += ["--key-end", end]
        if self.max_copied < 1.0:
            out += ["--max-copied", f"{self.max_copied:g}"]
        if self.distill:
            out.append("--distill")
        return out


@dataclass
class CorpusStats:
    """How varied the outputs are, and whether they have field syntax."""

    outputs: int
    distinct_share: float  # distinct outputs / outputs
    repeated_ngram_share: float  # share of the outputs' token 4-grams seen min_count+ times (original tokenizer)
    tokens_per_output: float
    key_end: str | None  # the field syntax found (what ends a field's name), or None: free text
    separator: str | None
    field_share: float  # share of outputs with 2+ fields of that syntax


@dataclass
class VocabProbe:
    """Probe 1: the candidate's vocabulary, no model."""

    new_tokens: int
    stop_reason: str
    heldout_reduction: float  # 1 - held-out tokens after / before
    train_reduction: float
    tokens_saved_per_output: float  # on the held-out outputs
    crossing_share: float  # new tokens that cross a field boundary: the separator inside, or past a field name's end
    name_value_share: float  # new tokens holding a field's name (its end) and some of its value
    copied_share: float  # new tokens carrying a value copied from the prompt (CopiedValues share > 0.5; names spared)
    risks: list[str] = field(default_factory=list)
    first_tokens: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def risky(self) -> bool:
        return bool(self.risks)


@dataclass
class LikelihoodProbe:
    """Probe 2: after a pilot fine-tune, the held-out rows under teacher forcing (the original vocabulary's pilot
    read the same rows)."""

    steps: int
    rows: int
    nats_per_output: float
    original_nats_per_output: float
    teacher_forced_metric: float
    original_teacher_forced_metric: float
    seconds: float = 0.0

    @property
    def nats_gap(self) -> float:
        return self.nats_per_output - self.original_nats_per_output

    @property
    def delta(self) -> float:
        return self.teacher_forced_metric - self.original_teacher_forced_metric


@dataclass
class PilotProbe:
    """Probe 3: both pilot models decode the held-out prompts greedily."""

    rows: int
    metric: float
    original_metric: float
    tokens_per_output: float
    original_tokens_per_output: float
    seconds: float = 0.0

    @property
    def delta(self) -> float:
        return self.metric - self.original_metric


@dataclass
class CandidateEvidence:
    """A candidate recipe, what each probe found, and the verdict."""

    recipe: Recipe
    vocab: VocabProbe | None = None
    likelihood: LikelihoodProbe | None = None
    pilot: PilotProbe | None = None
    predicted_delta: float | None = None  # metric points against the original vocabulary
    predicted_by: str = ""  # "teacher-forced", "pilot decoding" or "" (vocabulary statistics only)
    status: str = "candidate"  # "chosen", "eligible" (within the bound, less compression), "rejected"
    reason: str = ""

    @property
    def reduction(self) -> float:
        return self.vocab.heldout_reduction if self.vocab else 0.0

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.recipe.name, "recipe": asdict(self.recipe), "flags": self.recipe.flags()}
        out["vocab"] = asdict(self.vocab) if self.vocab else None
        if self.likelihood:
            out["likelihood"] = asdict(self.likelihood) | {
                "nats_gap": self.likelihood.nats_gap,
                "delta": self.likelihood.delta,
            }
        else:
            out["likelihood"] = None
        out["pilot"] = asdict(self.pilot) | {"delta": self.pilot.delta} if self.pilot else None
        out |= {
            "predicted_delta": self.predicted_delta,
            "predicted_by": self.predicted_by,
            "status": self.status,
            "reason": self.reason,
        }
        return out


@dataclass
class RecipeChoice:
    """The chosen recipe (None: keep the original vocabulary), every candidate's evidence, and why."""

    chosen: Recipe | None
    candidates: list[CandidateEvidence]
    metric: str
    bound: float
    corpus: CorpusStats
    message: str
    probe_rows: int = 0
    seconds: float = 0.0

    @property
    def no_op(self) -> bool:
        return self.chosen is None

    def to_dict(self) -> dict[str, Any]:
        return {
            "chosen": self.chosen.name if self.chosen else None,
            "chosen_recipe": asdict(self.chosen) if self.chosen else None,
            "flags": self.chosen.flags() if self.chosen else [],
            "no_op": self.no_op,
            "metric": self.metric,
            "bound": self.bound,
            "message": self.message,
            "corpus": asdict(self.corpus),
            "probe_rows": self.probe_rows,
            "seconds": round(self.seconds, 2),
            "candidates": [c.to_dict() for c in self.candidates],
        }

    def table(self) -> str:
        """The candidates as a markdown table: tokens saved, predicted quality delta, verdict and reason."""
        lines = [
            f"| candidate | new tokens | held-out tokens saved | predicted {self.metric} delta | by | verdict | why |",
            "|---|---|---|---|---|---|---|",
        ]
        for c in self.candidates:
            v = c.vocab
            saved = f"{100 * v.heldout_reduction:.1f}% ({v.tokens_saved_per_output:.1f}/output)" if v else "-"
            delta = f"{c.predicted_delta:+.2f}" if c.predicted_delta is not None else "-"
            lines.append(
                f"| {c.recipe.name} | {v.new_tokens if v else '-'} | {saved} | {delta} | {c.predicted_by or '-'} | "
                f"{c.status} | {c.reason} |"
            )
        return "\n".join(lines) + "\n\n" + self.message + "\n"


# ----------------------------------------------------------------------------------------------------------------
# Corpus statistics and candidates
# ----------------------------------------------------------------------------------------------------------------
def detect_field_syntax(outputs: Sequence[str]) -> tuple[str | None, str | None, float]:
    """(what ends a field's name, the separator between fields, share of outputs with 2+ such fields): the first of
    FIELD_SYNTAXES that at least FIELD_SHARE of the outputs follow, else (None, None, best share)."""
    best = 0.0
    for end, separator in FIELD_SYNTAXES:
        name = re.compile(r"[A-Za-z_][\w ]{0,30}" + re.escape(end))
        share = sum(len(name.findall(o)) >= 2 for o in outputs) / max(1, len(outputs))
        if share >= FIELD_SHARE:
            return end, separator, share
        best = max(best, share)
    return None, None, best


def corpus_stats(outputs: Sequence[str], tokenizer: PreTrainedTokenizerBase, min_count: int) -> CorpusStats:
    """How varied the outputs are (distinct share, repeated 4-grams) and their field syntax."""
    from tasc_ray.engine.drafts.index import tokenize_texts

    seqs = tokenize_texts(list(outputs), tokenizer)
    counts: dict[tuple[int, ...], int] = {}
    total = 0
    for s in seqs:
        ids = s.tolist()
        for i in range(len(ids) - 3):
            key = tuple(ids[i : i + 4])
            counts[key] = counts.get(key, 0) + 1
            total += 1
    repeated = sum(c for c in counts.values() if c >= min_count)
    end, separator, share = detect_field_syntax(outputs)
    return CorpusStats(
        outputs=len(outputs),
        distinct_share=round(len(set(outputs)) / max(1, len(outputs)), 4),
        repeated_ngram_share=round(repeated / max(1, total), 4),
        tokens_per_output=round(sum(len(s) for s in seqs) / max(1, len(seqs)), 3),
        key_end=end,
        separator=separator,
        field_share=round(share, 4),
    )


def candidate_recipes(stats: CorpusStats, budget: int, with_prompts: bool, distill: bool) -> list[Recipe]:
    """The full-size candidates for a corpus: plain enrichment always; with field syntax, field names apart from
    values (and, with prompts, copied values kept out too); without it (free text), distillation when allowed."""
    out = [Recipe("default", budget)]
    if stats.key_end is not None:
        out.append(Recipe("key-end", budget, key_end=(stats.key_end,)))
        if with_prompts:
            out.append(Recipe("key-end-copied", budget, key_end=(stats.key_end,), max_copied=0.5))
    elif distill:
        out.append(Recipe("distill", budget, distill=True))
    return out


def split_rows(
    outputs: Sequence[str], n_held: int, seed: int, prompts: Sequence[str] | None = None
) -> tuple[list[int], list[int]]:
    """(training rows, held-out rows): the rows of `n_held` distinct outputs (fewer when the corpus is small: at
    most a quarter of them) are held out, so no held-out output is also a training one; one row per held-out
    output, its first."""
    distinct = sorted(set(outputs))
    random.Random(seed).shuffle(distinct)
    held = set(distinct[: min(n_held, len(distinct) // 4)])
    first: dict[str, int] = {}
    for i, o in enumerate(outputs):
        if o in held:
            first.setdefault(o, i)
    return [i for i, o in enumerate(outputs) if o not in held], sorted(first.values())


# ----------------------------------------------------------------------------------------------------------------
# Probe 1: vocabulary statistics
# ----------------------------------------------------------------------------------------------------------------
def vocab_probe(
    tokenizer: PreTrainedTokenizerBase,
    recipe: Recipe,
    base: EnrichConfig,
    train: list[str],
    held: list[str],
    stats: CorpusStats,
    copied: CopiedValues | None,
    train_prompts: list[str] | None,
) -> tuple[VocabProbe, PreTrainedTokenizerBase, list[NewToken]]:
    """Enrich on the training outputs with the recipe; measure the vocabulary on the held-out outputs."""
    t0 = time.perf_counter()
    config = replace(recipe.enrich_config(base), holdout=0.0)
    try:
        result = enrich_tokenizer(tokenizer, train, config, progress=False, prompts=train_prompts)
        enriched, new, stop = result.tokenizer, result.new_tokens, result.stop_reason
    except VocabEnrichmentError as exc:
        enriched, new, stop = tokenizer, [], str(exc)
    before_h, before_t = count_tokens(tokenizer, held), count_tokens(tokenizer, train)
    after_h = count_tokens(enriched, held) if new else before_h
    after_t = count_tokens(enriched, train) if new else before_t
    tokens = [t.token for t in new]
    name_value = [t for t in tokens if stats.key_end and goes_past(t, stats.key_end)]
    crossing = [t for t in tokens if t in name_value or (stats.separator and crosses(t, stats.separator))]
    ends = (stats.key_end,) if stats.key_end else ()
    copied_tokens = [t for t in tokens if copied and not is_field_name(t, ends) and copied.share(t) > 0.5]
    probe = VocabProbe(
        new_tokens=len(new),
        stop_reason=stop,
        heldout_reduction=round(1 - after_h / before_h, 4) if before_h else 0.0,
        train_reduction=round(1 - after_t / before_t, 4) if before_t else 0.0,
        tokens_saved_per_output=round((before_h - after_h) / max(1, len(held)), 3),
        crossing_share=round(len(crossing) / max(1, len(tokens)), 4),
        name_value_share=round(len(name_value) / max(1, len(tokens)), 4),
        copied_share=round(len(copied_tokens) / max(1, len(tokens)), 4),
        first_tokens=tokens[:12],
    )
    if new and stats.key_end and probe.name_value_share > RISKY_CROSSING:
        probe.risks.append(f"{100 * probe.name_value_share:.0f}% of its tokens join a field's name to its value")
    if new and probe.copied_share > RISKY_COPIED:
        probe.risks.append(f"{100 * probe.copied_share:.0f}% of its tokens carry values copied from the prompt")
    if new and probe.train_reduction - probe.heldout_reduction > RISKY_FIT_GAP:
        probe.risks.append(
            f"fitted to the training outputs (saves {100 * probe.train_reduction:.0f}% there, "
            f"{100 * probe.heldout_reduction:.0f}% on held-out ones)"
        )
    probe.seconds = round(time.perf_counter() - t0, 3)
    return probe, enriched, new


# ----------------------------------------------------------------------------------------------------------------
# Probes 2 and 3: pilot fine-tunes, teacher-forced reading, pilot decoding
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class RecipeOptions:
    """How `finetune --recipe auto` and `ft-pipeline --recipe auto` probe (`choose_recipe`'s probe sizes)."""

    probe_rows: int = 32  # distinct outputs held out to measure each candidate
    pilot_steps: int = 24  # steps of each pilot fine-tune
    pilot_batch_size: int = 8
    max_pilots: int = 4  # candidates fine-tuned at most
    likelihood: bool = True  # False: vocabulary statistics only
    pilot_decode: bool = True  # decode where the probes disagree

    def validate(self) -> None:
        if self.probe_rows < 1 or self.pilot_steps < 1 or self.pilot_batch_size < 1 or self.max_pilots < 1:
            raise RecipeError("probe_rows, pilot_steps, pilot_batch_size and max_pilots must be >= 1")

    def pilot(self, stop: Sequence[str], max_new_tokens: int, seed: int) -> PilotSettings:
        return PilotSettings(
            steps=self.pilot_steps,
            batch_size=self.pilot_batch_size,
            stop=tuple(stop),
            max_new_tokens=max_new_tokens,
            seed=seed,
        )

    def choose(
        self,
        outputs: Sequence[str],
        prompts: Sequence[str] | None,
        metric: str,
        bound: float,
        *,
        model: str,
        base_config: EnrichConfig,
        stop: Sequence[str] = ("\n",),
        max_new_tokens: int = 64,
        teacher: str | None = None,
        distill: bool = True,
        seed: int = 0,
    ) -> RecipeChoice:
        """`choose_recipe` with these probe sizes."""
        self.validate()
        return choose_recipe(
            outputs,
            prompts,
            metric,
            bound,
            model=model,
            base_config=base_config,
            distill=distill,
            teacher=teacher,
            probe_rows=self.probe_rows,
            pilot=self.pilot(stop, max_new_tokens, seed),
            likelihood=self.likelihood,
            pilot_decode=self.pilot_decode,
            max_pilots=self.max_pilots,
            seed=seed,
        )


def label_with_teacher(
    teacher: str, rows: list[dict[str, str]], stop: Sequence[str], max_new_tokens: int, batch_size: int = 8
) -> list[dict[str, str]]:
    """The rows with the teacher model's greedy outputs as their outputs (the distill recipe's training data; an
    empty output or one the length limit cut keeps the row's own)."""
    from tasc_ray.engine.config import EngineConfig
    from tasc_ray.engine.load import load_engine
    from tasc_ray.engine.sampling import SamplingParams

    generator = load_engine(EngineConfig(model=teacher, max_batch_size=batch_size))
    params = SamplingParams(max_new_tokens=max_new_tokens, stop=list(stop))
    results = generator.generate([r["prompt"] for r in rows], params)
    return [
        {
            "prompt": r["prompt"],
            "output": res.text.strip() if res.text.strip() and res.finish_reason != "length" else r["output"],
        }
        for r, res in zip(rows, results)
    ]


@dataclass
class PilotSettings:
    """The pilot fine-tunes' recipe (full fine-tuning, as the measured recipes; new rows at lr_mult x lr)."""

    steps: int = 24
    batch_size: int = 8
    lr: float = 1e-4
    new_token_lr_mult: float = 10.0
    max_length: int = 256
    max_new_tokens: int = 64
    stop: tuple[str, ...] = ("\n",)
    decode_batch_size: int = 8
    seed: int = 0


def pilot_finetune(
    base: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    new_tokens: Sequence[NewToken],
    rows: list[dict[str, str]],
    settings: PilotSettings,
) -> PreTrainedModel:
    """A copy of `base`, its embeddings resized for `new_tokens` (mean-of-constituents rows), fully fine-tuned for
    `settings.steps` steps on `rows` (loss on the outputs only, as `tasc_ray.ft.train`)."""
    from tasc_ray.ft.train import NewRowBoost, _collate, encode_rows

    torch.manual_seed(settings.seed)
    model = copy.deepcopy(base)
    init_new_embeddings(model, list(new_tokens), base.get_input_embeddings().weight.shape[0])
    model.train()
    examples = encode_rows(tokenizer, rows, settings.max_length)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=0.0)
    boost = NewRowBoost(model, [t.id for t in new_tokens], settings.new_token_lr_mult)
    order = list(range(len(examples)))
    rng = random.Random(settings.seed)
    for step in range(settings.steps):
        start = (step * settings.batch_size) % max(1, len(order))
        if start < settings.batch_size:
            rng.shuffle(order)
        batch = _collate([examples[j] for j in order[start : start + settings.batch_size]], pad)
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        boost.before_step()
        optimizer.step()
        boost.after_step()
        optimizer.zero_grad(set_to_none=True)
    model.eval()
    return model


@torch.no_grad()
def teacher_forced(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    rows: list[dict[str, str]],
    max_length: int,
    batch_size: int = 8,
) -> tuple[list[float], list[str]]:
    """Per row: the output's cost in nats (output tokens and EOS, prompt given) and the teacher-forced prediction
    (the argmax at every output position, decoded; greedy decoding gives the output itself iff this equals it)."""
    from tasc_ray.ft.train import _collate, encode_rows

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    examples = encode_rows(tokenizer, rows, max_length)
    nats: list[float] = []
    preds: list[str] = []
    for i in range(0, len(examples), batch_size):
        batch = _collate(examples[i : i + batch_size], pad)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
        labels = batch["labels"][:, 1:]
        logp = torch.log_softmax(logits, dim=-1)
        mask = labels != -100
        picked = logp.gather(-1, labels.clamp(min=0)[..., None])[..., 0]
        nats += (-(picked * mask).sum(-1)).tolist()
        argmax = logits.argmax(-1)
        for b in range(len(labels)):
            ids = argmax[b][mask[b]].tolist()
            preds.append(tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False).strip())
    return nats, preds


def greedy_outputs(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[str], settings: PilotSettings
) -> tuple[list[str], float]:
    """Greedy outputs of an in-memory model (the engine, plain decoding) and output tokens per prompt."""
    from tasc_ray.engine.config import EngineConfig
    from tasc_ray.engine.generator import SamplingParams, SpeculativeGenerator

    gen = SpeculativeGenerator(model, tokenizer, None, EngineConfig(max_batch_size=settings.decode_batch_size))
    params = SamplingParams(max_new_tokens=settings.max_new_tokens, stop=list(settings.stop), speculative=False)
    out = gen.generate(prompts, params)
    return [r.text.strip() for r in out], sum(r.new_tokens for r in out) / max(1, len(out))


# ----------------------------------------------------------------------------------------------------------------
# The choice
# ----------------------------------------------------------------------------------------------------------------
def _reject(c: CandidateEvidence, reason: str) -> None:
    c.status, c.reason = "rejected", reason


def choose_recipe(
    outputs: Sequence[str],
    prompts: Sequence[str] | None,
    metric: str = "exact_match",
    bound: float = 1.0,
    *,
    model: str | None = "smollm2-135m",
    tokenizer: PreTrainedTokenizerBase | None = None,
    base_config: EnrichConfig | None = None,
    sizes: bool = True,
    distill: bool = True,
    teacher: str | None = None,
    probe_rows: int = 32,
    pilot: PilotSettings | None = None,
    likelihood: bool = True,
    pilot_decode: bool = True,
    max_pilots: int = 4,
    min_reduction: float = 0.05,
    seed: int = 0,
) -> RecipeChoice:
    """Probe the candidate recipes on the task's outputs (and prompts) and choose the one with the most held-out
    compression whose predicted `metric` delta is at least -`bound` points (see the module docstring).

    `model` is the original model (loaded for the likelihood probe; its tokenizer unless `tokenizer` is given);
    `likelihood=False` (or no prompts, or no model) stops after the vocabulary statistics, which then choose among
    the candidates they find no risk in. `teacher` labels the pilot rows for the `distill` candidate (default: the
    original vocabulary's pilot model, the task model a distilled run trains first)."""
    t_start = time.perf_counter()
    if metric not in METRICS:
        raise RecipeError(f"unknown metric {metric!r}; choose one of {', '.join(METRICS)}")
    outputs = list(outputs)
    if prompts is not None and len(prompts) != len(outputs):
        raise RecipeError(f"{len(outputs)} outputs but {len(prompts)} prompts")
    keep = [i for i, o in enumerate(outputs) if isinstance(o, str) and o.strip()]
    if prompts is not None:
        keep = [i for i in keep if isinstance(prompts[i], str) and prompts[i]]
    if not keep:
        raise RecipeError("no non-empty outputs (empty corpus)")
    outputs = [outputs[i] for i in keep]
    prompt_list = [prompts[i] for i in keep] if prompts is not None else None
    base_config = base_config or EnrichConfig()
    pilot = pilot or PilotSettings(seed=seed)
    if tokenizer is None:
        if model is None:
            raise RecipeError("give a model or a tokenizer")
        from tasc_ray.models import load_tokenizer

        tokenizer = load_tokenizer(model)

    train_idx, held_idx = split_rows(outputs, probe_rows, seed)
    train = [outputs[i] for i in train_idx]
    held = [outputs[i] for i in held_idx]
    train_prompts = [prompt_list[i] for i in train_idx] if prompt_list else None
    stats = corpus_stats(outputs, tokenizer, base_config.min_count)
    copied = CopiedValues(train, train_prompts) if train_prompts else None
    choice = RecipeChoice(None, [], metric, bound, stats, "", probe_rows=len(held))
    if not held:
        choice.message = (
            f"no-op: {len(set(outputs))} distinct outputs are too few to hold any out and measure a recipe; keep the "
            "original vocabulary (TASC-spec still applies)"
        )
        choice.seconds = time.perf_counter() - t_start
        return choice

    # probe 1: vocabulary statistics, full sizes first, then the smaller size of each that added tokens
    enriched: dict[str, tuple[PreTrainedTokenizerBase, list[NewToken]]] = {}
    full = candidate_recipes(stats, base_config.budget, train_prompts is not None, distill)
    seen_tokens: dict[tuple[str, ...], str] = {}

    def probe(recipe: Recipe) -> None:
        c = CandidateEvidence(recipe)
        choice.candidates.append(c)
        c.vocab, tok, new = vocab_probe(tokenizer, recipe, base_config, train, held, stats, copied, train_prompts)
        key = tuple(t.token for t in new)
        if not new:
            _reject(c, f"adds no token ({c.vocab.stop_reason})")
        elif c.vocab.heldout_reduction < min_reduction:
            _reject(c, f"saves {100 * c.vocab.heldout_reduction:.1f}% of held-out tokens (< {100 * min_reduction:g}%)")
        elif key in seen_tokens and not recipe.distill:
            _reject(c, f"the same tokens as {seen_tokens[key]}")
        else:
            seen_tokens.setdefault(key, recipe.name)
            enriched[recipe.name] = (tok, new)

    for recipe in full:
        probe(recipe)
    if sizes:
        for c in list(choice.candidates):
            n = c.vocab.new_tokens if c.vocab else 0
            small = max(4, n // 4)
            if n >= 8 and small < c.recipe.budget:
                probe(replace(c.recipe, budget=small))

    alive = [c for c in choice.candidates if c.status != "rejected"]
    if not alive:
        if all(c.vocab is None or c.vocab.new_tokens == 0 for c in choice.candidates):
            choice.message = (
                f"no-op: enrichment added no token on {len(train)} training outputs: the corpus is too small or too "
                f"varied for TASC-ft (an n-gram must occur {base_config.min_count}+ times; "
                f"{100 * stats.distinct_share:.0f}% of the outputs are distinct, "
                f"{100 * stats.repeated_ngram_share:.0f}% of their 4-grams repeat that often); keep the original "
                "vocabulary (TASC-spec still applies)"
            )
        else:
            choice.message = (
                f"no-op: no candidate saves {100 * min_reduction:g}% of the held-out outputs' tokens; keep the "
                "original vocabulary"
            )
        choice.seconds = time.perf_counter() - t_start
        return choice

    # probe 2 (and 3): most compressing candidates first; the first one within the bound is the choice, since no
    # candidate after it compresses more
    alive.sort(key=lambda c: (-c.reduction, c.recipe.budget))
    can_probe = likelihood and prompt_list is not None and model is not None
    if can_probe:
        assert prompt_list is not None and model is not None
        _likelihood_probes(choice, alive, enriched, model, tokenizer, outputs, prompt_list, train_idx, held_idx,
                           pilot, teacher, pilot_decode, max_pilots)  # fmt: skip
    else:
        why = "no prompts" if prompt_list is None else ("no model" if model is None else "likelihood probe off")
        for c in alive:
            if c.vocab and c.vocab.risky:
                _reject(c, "risky by the vocabulary statistics: " + "; ".join(c.vocab.risks) + f" ({why})")
            else:
                c.status, c.reason = "eligible", f"no risk in its vocabulary statistics ({why}: not fine-tuned)"

    decide(choice, alive)
    choice.seconds = time.perf_counter() - t_start
    logger.info("%s", choice.message)
    return choice


def decide(choice: RecipeChoice, alive: list[CandidateEvidence]) -> None:
    """Choose, among the candidates marked eligible, the one with the most held-out compression (the smaller budget
    on a tie); set the choice's recipe and message. None eligible: the no-op."""
    metric, bound = choice.metric, choice.bound
    eligible = [c for c in alive if c.status == "eligible"]
    if not eligible:
        probed = [c for c in alive if c.predicted_delta is not None]
        choice.chosen = None
        choice.message = (
            f"no-op: no candidate is predicted within {bound:g} {metric} points of the original vocabulary ("
            + ", ".join(f"{c.recipe.name} {c.predicted_delta:+.2f}" for c in probed if c.predicted_delta is not None)
            + "); keep the original vocabulary (TASC-spec still applies)"
        )
        return
    best = max(eligible, key=lambda c: (c.reduction, -c.recipe.budget))
    best.status = "chosen"
    best.reason = "most compression within the bound" + (f"; {best.reason}" if best.reason else "")
    for c in eligible:
        if c is not best:
            c.reason = f"within the bound, but saves less than {best.recipe.name}"
    choice.chosen = best.recipe
    delta = f"{best.predicted_delta:+.2f}" if best.predicted_delta is not None else "not predicted"
    choice.message = (
        f"chosen: {best.recipe.name} ({' '.join(best.recipe.flags())}): saves {100 * best.reduction:.1f}% of the "
        f"held-out outputs' tokens, predicted {metric} delta {delta} (bound -{bound:g})"
    )


def verdict(c: CandidateEvidence, bound: float) -> None:
    """A probed candidate's status from its prediction: eligible when at least -`bound`, else rejected."""
    assert c.predicted_delta is not None
    risks = "; ".join(c.vocab.risks) if c.vocab and c.vocab.risks else "no risk in its vocabulary statistics"
    gap = f"{c.likelihood.nats_gap:+.2f} nats per output; " if c.likelihood else ""
    if c.predicted_delta >= -bound:
        c.status, c.reason = "eligible", f"predicted within the bound ({gap}{risks})"
    else:
        _reject(c, f"predicted {c.predicted_delta:+.2f} < -{bound:g} ({gap}{risks})")


def _likelihood_probes(
    choice: RecipeChoice,
    alive: list[CandidateEvidence],
    enriched: dict[str, tuple[PreTrainedTokenizerBase, list[NewToken]]],
    model_name: str,
    tokenizer: PreTrainedTokenizerBase,
    outputs: list[str],
    prompts: list[str],
    train_idx: list[int],
    held_idx: list[int],
    pilot: PilotSettings,
    teacher: str | None,
    pilot_decode: bool,
    max_pilots: int,
) -> None:
    """Probes 2 and 3 on the candidates still alive (most compressing first), until one is within the bound or
    `max_pilots` were fine-tuned; sets each probed one's prediction, status and reason."""
    from tasc_ray.models import load_model

    metric, bound = choice.metric, choice.bound
    base, _ = load_model(model_name, dtype="float32", device="cpu")
    rng = random.Random(pilot.seed)
    n_rows = min(len(train_idx), max(pilot.batch_size, pilot.steps * pilot.batch_size))
    rows = [{"prompt": prompts[i], "output": outputs[i]} for i in rng.sample(train_idx, n_rows)]
    held = [{"prompt": prompts[i], "output": outputs[i]} for i in held_idx]
    refs = [h["output"] for h in held]
    t0 = time.perf_counter()
    original = pilot_finetune(base, tokenizer, [], rows, pilot)
    o_nats, o_preds = teacher_forced(original, tokenizer, held, pilot.max_length)
    o_score = score(metric, o_preds, refs)
    o_seconds = time.perf_counter() - t0
    o_decoded: tuple[list[str], float] | None = None
    distill_rows: list[dict[str, str]] | None = None
    piloted = 0
    for c in alive:
        if any(o.status == "eligible" for o in alive):
            _reject(c, "not probed: a more compressing candidate is within the bound")
            continue
        if piloted >= max_pilots:
            _reject(c, f"not probed: {max_pilots} candidates were (max_pilots)")
            continue
        piloted += 1
        t1 = time.perf_counter()
        tok, new = enriched[c.recipe.name]
        train_rows = rows
        if c.recipe.distill:
            if distill_rows is None:
                distill_rows = _teacher_rows(teacher, original, tokenizer, rows, pilot)
            train_rows = distill_rows
        tuned = pilot_finetune(base, tok, new, train_rows, pilot)
        nats, preds = teacher_forced(tuned, tok, held, pilot.max_length)
        c.likelihood = LikelihoodProbe(
            steps=pilot.steps,
            rows=len(held),
            nats_per_output=round(sum(nats) / len(nats), 3),
            original_nats_per_output=round(sum(o_nats) / len(o_nats), 3),
            teacher_forced_metric=round(score(metric, preds, refs), 3),
            original_teacher_forced_metric=round(o_score, 3),
            seconds=round(time.perf_counter() - t1 + (o_seconds if piloted == 1 else 0.0), 2),
        )
        c.predicted_delta, c.predicted_by = round(c.likelihood.delta, 3), "teacher-forced"
        within = c.predicted_delta >= -bound
        risky = bool(c.vocab and c.vocab.risky)
        if pilot_decode and within == risky:  # the probes disagree: decode
            t2 = time.perf_counter()
            prompts_held = [h["prompt"] for h in held]
            if o_decoded is None:
                o_decoded = greedy_outputs(original, tokenizer, prompts_held, pilot)
            texts, per_output = greedy_outputs(tuned, tok, prompts_held, pilot)
            c.pilot = PilotProbe(
                rows=len(held),
                metric=round(score(metric, texts, refs), 3),
                original_metric=round(score(metric, o_decoded[0], refs), 3),
                tokens_per_output=round(per_output, 3),
                original_tokens_per_output=round(o_decoded[1], 3),
                seconds=round(time.perf_counter() - t2, 2),
            )
            c.predicted_delta, c.predicted_by = round(c.pilot.delta, 3), "pilot decoding"
        del tuned
        verdict(c, bound)
        logger.info("recipe %s: %s %s", c.recipe.name, c.status, c.reason)


def _teacher_rows(
    teacher: str | None,
    original: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    rows: list[dict[str, str]],
    pilot: PilotSettings,
) -> list[dict[str, str]]:
    """The pilot rows with the teacher's greedy outputs (an empty one keeps the reference)."""
    if teacher is not None:
        from tasc_ray.models import load_model

        model, tok = load_model(teacher, dtype="float32", device="cpu")
    else:
        model, tok = original, tokenizer
    texts, _ = greedy_outputs(model, tok, [r["prompt"] for r in rows], pilot)
    return [{"prompt": r["prompt"], "output": t or r["output"]} for r, t in zip(rows, texts)]
