"""TASC-ft fine-tuning, the part that needs no Ray: the configs, the data, the model and the training loop.

The loss covers output tokens only (prompt positions are labelled -100). Two recipes:

* LoRA (default, peft): adapters on every linear layer of the blocks, plus the embedding rows of the tokenizer's
  added (non-special) tokens trainable through peft's `trainable_token_indices` (tied LM heads follow).
* Full fine-tuning (`full=True`): every parameter; `NewRowBoost` gives the new rows their own learning rate.

Either recipe can spell a share of the outputs' new tokens in their original tokens at each step (`NewTokenDropout`),
and can first teach the new rows to be read like the text they stand for (`NewRowAlignment`, label-free distillation
from the model's own reading of the original spelling).

`run_training(LoopConfig, session)` is one worker's loop: resume from the session's latest checkpoint, train,
report a checkpoint (trainable state + optimizer) after each epoch. The session is `LocalSession` here (one
in-process worker, local checkpoints, for machines without Ray) or the Ray Train session of
`tasc_ray.stages.finetune`, which also runs the whole job (`finetune`). `save_merged` rebuilds the model from the
final state, merges LoRA and writes a plain Hugging Face directory atomically (`tasc_ray.io.atomic_directory`).
"""

from __future__ import annotations

import json
import logging
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from tqdm.auto import tqdm

from tasc_ray.io import CorpusError, atomic_directory, read_texts

logger = logging.getLogger(__name__)

STATE_FILE = "state.pt"
SUMMARY_FILE = "finetune.json"
LORA_TARGETS = "all-linear"

# Called by every worker after each epoch's checkpoint with (epochs done, the epoch the run resumed from or None);
# tests inject failures with it.
EpochHook = Callable[[int, "int | None"], None]

# The new tokens' embedding rows learn at 10x the learning rate by default: they start as the mean of their
# constituents' rows and must move far in few steps, while AdamW moves each coordinate by about the learning rate
# per step. Measured on E2E MR -> text (512 rows, full fine-tuning, lr 1e-4; benchmarks/results/ft_mr2text_cpu_splits*
# .md): BLEU -15.1 -> -11.6 and decoding 1.36x -> 1.62x against the original vocabulary. It narrows the gap; it does
# not close it (README, TASC-ft).
DEFAULT_NEW_TOKEN_LR_MULT = 10.0

# The share of the outputs' new tokens spelled in their original-vocabulary tokens at each training step
# (`NewTokenDropout`); 0 trains on the canonical enriched tokenisation only. Off: on E2E MR -> text (256 rows,
# benchmarks/results/ft_ablation) 0.2 lowered the cost of the text around the new tokens, but it splits each phrase's
# probability between its two spellings, so greedy decoding chose the original one more often (new tokens 8% of the
# generated tokens instead of 26%, 1.04x instead of 1.65x) and BLEU did not improve (-15.5 against -14.4).
DEFAULT_NEW_TOKEN_DROPOUT = 0.0

# Alignment steps train the new rows alone, before the schedule, so that the model reads a new token as it reads
# its original spelling (`NewRowAlignment`); Adam at this learning rate (the rows' norms are about 3). Off: on E2E
# MR -> text (256 rows, benchmarks/results/ft_ablation) 48 steps cut the reading KL from 0.36 to 0.11 nats per
# position, but after fine-tuning the held-out references' cost gap was +5.8 nats with SmolLM2's tied rows
# (emitting the new tokens got worse) and +4.5 with untied ones, against +3.7 / +4.0 (two seeds) without it.
DEFAULT_NEW_TOKEN_ALIGN_STEPS = 0
DEFAULT_NEW_TOKEN_ALIGN_LR = 1e-2


class FinetuneError(ValueError):
    """Bad fine-tuning input: missing columns, empty data, no GPU for --use-gpu, an unusable model directory."""


@dataclass
class FinetuneConfig:
    """A fine-tuning job, as the CLI and the benchmarks describe it."""

    model: str
    train: str  # parquet, jsonl or csv (file, directory or glob, local or s3://) with a prompt and an output column
    out: str
    prompt_column: str = "prompt"
    output_column: str = "output"
    epochs: int = 3
    lr: float | None = None  # default: 2e-4 for LoRA, 5e-5 for full fine-tuning
    lora_r: int = 16
    lora_alpha: int | None = None  # default 2 * lora_r
    new_token_lr_mult: float = DEFAULT_NEW_TOKEN_LR_MULT  # learning-rate multiplier of the new tokens' rows
    new_token_warmup_steps: int = 0  # steps that train the new tokens' rows alone, before the schedule (0: none)
    new_token_dropout: float = DEFAULT_NEW_TOKEN_DROPOUT  # chance that an output's new token is spelled in base tokens
    new_token_align_steps: int = DEFAULT_NEW_TOKEN_ALIGN_STEPS  # steps aligning the new rows' reading (0: none)
    new_token_align_lr: float = DEFAULT_NEW_TOKEN_ALIGN_LR
    full: bool = False
    num_workers: int = 1
    cpus_per_worker: float | None = None  # default: the cluster's CPUs shared among the workers
    use_gpu: bool = False
    bf16: bool = False  # autocast in bf16 (GPU)
    storage_path: str | None = None  # default: <out>.ray next to the output
    name: str | None = None  # the Ray Train run name; the same name + storage path resumes
    max_steps: int | None = None
    batch_size: int = 8  # global batch (split across workers)
    max_length: int = 512
    weight_decay: float = 0.0
    seed: int = 0
    max_failures: int = 0
    trainer: str = "ray"  # "ray" (TorchTrainer) or "local" (one in-process worker, for machines without Ray)
    progress: bool = False  # tqdm over steps on rank 0

    def resolved_lr(self) -> float:
        return self.lr if self.lr is not None else (5e-5 if self.full else 2e-4)

    def validate(self) -> None:
        if self.epochs <= 0:
            raise FinetuneError(f"epochs must be positive, got {self.epochs}")
        if self.new_token_warmup_steps < 0:
            raise FinetuneError(f"new_token_warmup_steps must be >= 0, got {self.new_token_warmup_steps}")
        if self.new_token_align_steps < 0 or self.new_token_align_lr <= 0:
            raise FinetuneError(
                f"need new_token_align_steps >= 0 and new_token_align_lr > 0 "
                f"(got {self.new_token_align_steps}, {self.new_token_align_lr})"
            )
        if not 0.0 <= self.new_token_dropout < 1.0:
            raise FinetuneError(f"new_token_dropout must be in [0, 1), got {self.new_token_dropout}")
        if self.max_steps is not None and self.max_steps <= 0:
            raise FinetuneError(f"max_steps must be positive, got {self.max_steps}")
        if self.num_workers < 1 or self.batch_size < self.num_workers:
            raise FinetuneError(
                f"need num_workers >= 1 and batch_size >= num_workers "
                f"(got {self.num_workers} workers, batch {self.batch_size})"
            )
        if self.trainer not in ("ray", "local"):
            raise FinetuneError(f"trainer must be 'ray' or 'local', got {self.trainer!r}")

    def storage(self) -> tuple[str, str]:
        """(checkpoint storage: a local directory or s3:// URL, run name); default <out>.ray, finetune-<out name>."""
        out = Path(self.out).expanduser().resolve()
        storage = self.storage_path or str(out.parent / f"{out.name}.ray")
        if "://" not in storage:
            storage = str(Path(storage).expanduser().resolve())
        return storage, self.name or f"finetune-{out.name}"


@dataclass
class LoopConfig:
    """What each worker's loop needs: the resolved model directory, the rows, and the recipe."""

    model_path: str
    rows: list[dict[str, str]]
    full: bool = False
    lora_r: int = 16
    lora_alpha: int | None = None
    lr: float = 2e-4
    new_token_lr_mult: float = DEFAULT_NEW_TOKEN_LR_MULT
    new_token_warmup_steps: int = 0
    new_token_dropout: float = DEFAULT_NEW_TOKEN_DROPOUT
    new_token_align_steps: int = DEFAULT_NEW_TOKEN_ALIGN_STEPS
    new_token_align_lr: float = DEFAULT_NEW_TOKEN_ALIGN_LR
    epochs: int = 3
    max_steps: int | None = None
    batch_size: int = 8
    max_length: int = 512
    weight_decay: float = 0.0
    seed: int = 0
    bf16: bool = False
    progress: bool = False

    @classmethod
    def from_job(cls, cfg: FinetuneConfig, model_path: str, rows: list[dict[str, str]]) -> LoopConfig:
        return cls(
            model_path=model_path,
            rows=rows,
            full=cfg.full,
            lora_r=cfg.lora_r,
            lora_alpha=cfg.lora_alpha,
            lr=cfg.resolved_lr(),
            new_token_lr_mult=cfg.new_token_lr_mult,
            new_token_warmup_steps=cfg.new_token_warmup_steps,
            new_token_dropout=cfg.new_token_dropout,
            new_token_align_steps=cfg.new_token_align_steps,
            new_token_align_lr=cfg.new_token_align_lr,
            epochs=cfg.epochs,
            max_steps=cfg.max_steps,
            batch_size=cfg.batch_size,
            max_length=cfg.max_length,
            weight_decay=cfg.weight_decay,
            seed=cfg.seed,
            bf16=cfg.bf16,
            progress=cfg.progress,
        )


# ----------------------------------------------------------------------------------------------------------------
# Data and model
# ----------------------------------------------------------------------------------------------------------------
def read_pairs(
    path: str | Path, prompt_column: str, output_column: str, storage_options: dict[str, Any] | None = None
) -> list[dict[str, str]]:
    """Rows of {"prompt", "output"} with a non-empty prompt and output, from any input `tasc_ray.io` reads."""
    try:
        corpus = read_texts(str(path), output_column, [prompt_column], storage_options, what="training")
    except CorpusError as exc:  # "training file not found: ...", "... has no column ...", "... (empty training ...)"
        raise FinetuneError(str(exc)) from exc
    pairs = zip(corpus.extras[prompt_column], corpus.texts)
    rows = [{"prompt": p, "output": o} for p, o in pairs if isinstance(p, str) and p]
    if not rows:
        raise FinetuneError(f"{path}: no rows with a non-empty {prompt_column!r} and {output_column!r} (empty data)")
    if len(rows) < corpus.stats["rows"]:
        logger.warning("%s: skipped %d rows with an empty prompt or output", path, corpus.stats["rows"] - len(rows))
    return rows


def select_gpu(use_gpu: bool, cluster_gpus: float | None = None) -> tuple[bool, str]:
    """(use_gpu, process-group backend). Refuses use_gpu with a clear error when there is no GPU to use."""
    if not use_gpu:
        return False, "gloo"
    available = cluster_gpus if cluster_gpus is not None else (torch.cuda.device_count() or 0)
    if available <= 0:
        raise FinetuneError(
            "--use-gpu was given but no GPU is available (torch.cuda.is_available() is False and "
            "the Ray cluster reports 0 GPUs); drop --use-gpu to train on CPU"
        )
    return True, "nccl"


def new_token_ids(tokenizer: Any) -> list[int]:
    """Ids of the tokenizer's added, non-special tokens (the TASC-ft vocabulary)."""
    return sorted(int(i) for i, t in tokenizer.added_tokens_decoder.items() if not t.special)


def _untied_head(model: Any) -> Any:
    """The LM head when it is not the input embedding (an untied model), else None."""
    head = model.get_output_embeddings()
    return None if head is None or head.weight is model.get_input_embeddings().weight else head


def embedding_matrices(model: Any) -> list[torch.Tensor]:
    """The matrices holding token rows: the input embedding, and the LM head's when it is untied."""
    head = _untied_head(model)
    return [model.get_input_embeddings().weight] + ([head.weight] if head is not None else [])


def _untied_head_name(model: Any) -> str | None:
    """The module name of the LM head when it is untied, else None."""
    head = _untied_head(model)
    return None if head is None else next(name for name, module in model.named_modules() if module is head)


def _lora_config(cfg: LoopConfig, new_ids: list[int], untied_head: str | None = None) -> Any:
    """LoRA on every linear layer; the new tokens' embedding rows trainable, and their LM-head rows too when the head
    is untied (a tied head follows the embedding)."""
    from peft import LoraConfig

    rows = {"embed_tokens": new_ids} | ({untied_head: new_ids} if untied_head else {})
    return LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha or 2 * cfg.lora_r,
        lora_dropout=0.0,
        target_modules=LORA_TARGETS,
        task_type="CAUSAL_LM",
        trainable_token_indices=rows if new_ids else None,
    )


def build_model(cfg: LoopConfig, device: torch.device | str = "cpu") -> tuple[Any, Any]:
    """The model to train (base + LoRA, or the base itself for full fine-tuning) and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(cfg.model_path)
    model = AutoModelForCausalLM.from_pretrained(cfg.model_path, dtype=torch.float32)
    if not cfg.full:
        from peft import get_peft_model

        model = get_peft_model(model, _lora_config(cfg, new_token_ids(tokenizer), _untied_head_name(model)))
    return model.to(device), tokenizer


def encode_rows(tokenizer: Any, rows: list[dict[str, str]], max_length: int) -> list[tuple[list[int], list[int]]]:
    """(input ids, labels) per row: prompt (special tokens as the tokenizer adds them) + output + EOS; labels
    are -100 on the prompt. Prompt and output are tokenised apart, so the output is tokenised exactly as the
    enriched vocabulary compresses it."""
    eos = tokenizer.eos_token_id
    out = []
    for row in rows:
        p = tokenizer(row["prompt"], add_special_tokens=True)["input_ids"]
        o = tokenizer(row["output"], add_special_tokens=False)["input_ids"] + ([eos] if eos is not None else [])
        ids, labels = (p + o)[:max_length], ([-100] * len(p) + o)[:max_length]
        out.append((ids, labels))
    return out


def _collate(batch: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(ids) for ids, _ in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, (x, y) in enumerate(batch):
        ids[i, : len(x)], labels[i, : len(y)], mask[i, : len(x)] = torch.tensor(x), torch.tensor(y), 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def trainable_state(model: Any, full: bool) -> dict[str, torch.Tensor]:
    if full:
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    from peft import get_peft_model_state_dict

    return {k: v.detach().cpu() for k, v in get_peft_model_state_dict(model).items()}


def load_trainable_state(model: Any, state: dict[str, torch.Tensor], full: bool) -> None:
    if full:
        model.load_state_dict(state)
    else:
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, state)


class NewRowBoost:
    """Full fine-tuning: a learning rate `mult` times higher for the new tokens' embedding rows (and untied LM-head
    rows). The AdamW step is linear in the learning rate, so scaling those rows' step by `mult` after the optimizer
    has taken it is the same as giving them `lr * mult`, without splitting the embedding matrix in two."""

    def __init__(self, model: Any, new_ids: list[int], mult: float) -> None:
        self.mult = mult
        self.matrices: list[torch.Tensor] = []  # empty: nothing to boost, both hooks do nothing
        self.before: list[torch.Tensor] = []
        if not new_ids or mult == 1.0:
            return
        self.matrices = embedding_matrices(model)
        self.ids = torch.tensor(new_ids, dtype=torch.long, device=self.matrices[0].device)

    def before_step(self) -> None:
        self.before = [w.detach()[self.ids] for w in self.matrices]  # advanced indexing copies

    @torch.no_grad()
    def after_step(self) -> None:
        for w, old in zip(self.matrices, self.before):
            w[self.ids] = old + (w[self.ids] - old) * self.mult


class NewRowWarmup:
    """Warm-up steps that train the new tokens' rows alone: after the backward pass every other gradient is dropped
    (AdamW skips a parameter without one), and in full fine-tuning the embedding matrix's gradient is kept on the
    new rows only. A model without new tokens has nothing to warm up."""

    def __init__(self, model: Any, new_ids: list[int], full: bool) -> None:
        self.keep: list[tuple[torch.Tensor, torch.Tensor | None]] = []  # (parameter, rows to keep or None for all)
        if not new_ids:
            return
        if full:
            rows = torch.tensor(new_ids, dtype=torch.long)
            self.keep = [(w, rows.to(w.device)) for w in embedding_matrices(model)]
        else:
            self.keep = [(p, None) for n, p in model.named_parameters() if "trainable_tokens_delta" in n]
        self.model = model

    @property
    def active(self) -> bool:
        return bool(self.keep)

    @torch.no_grad()
    def mask_gradients(self) -> None:
        kept = {id(p) for p, _ in self.keep}
        for p in self.model.parameters():
            if id(p) not in kept:
                p.grad = None
        for p, rows in self.keep:
            if rows is not None and p.grad is not None:
                mask = torch.zeros(p.shape[0], dtype=torch.bool, device=p.device)
                mask[rows] = True
                p.grad[~mask] = 0


def base_spellings(tokenizer: Any, new_ids: list[int]) -> dict[int, list[int]]:
    """Each added token's tokenisation by the tokenizer's own model alone (normaliser, pre-tokeniser, BPE), i.e. in
    original-vocabulary tokens: added tokens are matched before the model runs, so the model never yields them."""
    backend = tokenizer.backend_tokenizer
    spellings = {}
    for i in new_ids:
        text = tokenizer.convert_ids_to_tokens(i)
        if backend.normalizer is not None:
            text = backend.normalizer.normalize_str(text)
        pieces = backend.pre_tokenizer.pre_tokenize_str(text) if backend.pre_tokenizer is not None else [(text, None)]
        spellings[i] = [t.id for piece, _ in pieces for t in backend.model.tokenize(piece)]
    return spellings


class NewTokenDropout:
    """Subword regularisation for the new tokens. Trained on the canonical enriched tokenisation only, a model never
    sees a phrase that has a new token spelled in original tokens: once it emits `is`, `a` where the data always had
    ` is a coffee shop`, it is off its training distribution and falls back on the base model's habits (paraphrases,
    dropped slots). At every step each new token of an output is spelled in its original tokens with probability p
    (the prompt is left as inference tokenises it), so both paths are in the data."""

    def __init__(self, tokenizer: Any, new_ids: list[int], p: float) -> None:
        self.p = p
        self.spellings = base_spellings(tokenizer, new_ids) if new_ids and p > 0 else {}

    @property
    def active(self) -> bool:
        return bool(self.spellings)

    def apply(
        self, example: tuple[list[int], list[int]], rng: random.Random, max_length: int
    ) -> tuple[list[int], list[int]]:
        ids, labels = [], []
        for token, label in zip(*example):
            spelling = self.spellings.get(token) if label != -100 else None
            if spelling and rng.random() < self.p:
                ids += spelling
                labels += spelling
            else:
                ids.append(token)
                labels.append(label)
        return ids[:max_length], labels[:max_length]


class NewRowAlignment:
    """Teaches the model to read its new tokens before fine-tuning teaches it to emit them. A new row starts as the mean
    of its constituents' rows, and the model reads it badly: on E2E MR -> text the next-token distributions after
    the new tokens are ~27 nats per row away (KL) from the same model's reading of the original spelling. The
    alignment trains the new rows alone, label-free, on the training sequences: the teacher is the model reading the
    sequence with every new token spelled in its original tokens, the student the model reading the enriched
    tokenisation; at each student position, KL(teacher || student) over the original vocabulary, with the teacher
    taken at the last token of that position's spelling. The teacher's inputs never touch a new row, so the teacher
    is exact while the rows move."""

    def __init__(self, tokenizer: Any, new_ids: list[int], vocab_rows: int) -> None:
        self.spellings = base_spellings(tokenizer, new_ids) if new_ids else {}
        self.original = torch.ones(vocab_rows, dtype=torch.bool)
        self.original[[i for i in new_ids if i < vocab_rows]] = False

    def spell(self, ids: list[int]) -> tuple[list[int], list[int]]:
        """(ids with every new token in its original spelling, index there of each input token's last piece)."""
        spelled, last = [], []
        for i in ids:
            spelled += self.spellings.get(i, [i])
            last.append(len(spelled) - 1)
        return spelled, last

    def loss(self, model: Any, sequences: list[list[int]], pad_id: int, device: torch.device) -> torch.Tensor:
        """Mean KL(teacher || student) per position, over the original vocabulary."""
        spelled, last = zip(*(self.spell(ids) for ids in sequences))
        student = _collate([(ids, ids) for ids in sequences], pad_id)
        teacher = _collate([(ids, ids) for ids in spelled], pad_id)
        where = torch.zeros_like(student["input_ids"])
        for b, positions in enumerate(last):
            where[b, : len(positions)] = torch.tensor(positions)
        keep = self.original.to(device)
        with torch.no_grad():
            spelled_logits = model(**{k: v.to(device) for k, v in teacher.items() if k != "labels"}).logits
            index = where.to(device)[..., None].expand(-1, -1, spelled_logits.shape[-1])
            target = torch.log_softmax(spelled_logits.gather(1, index)[..., keep], dim=-1)
        mask = student["attention_mask"].to(device)
        logits = model(input_ids=student["input_ids"].to(device), attention_mask=mask).logits
        predicted = torch.log_softmax(logits[..., keep], dim=-1)
        kl = (target.exp() * (target - predicted)).sum(-1)
        return (kl * mask).sum() / mask.sum()


# ----------------------------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------------------------
class Session(Protocol):
    """A worker's view of its run: rank, world size, device, the latest checkpoint, and where to report."""

    rank: int
    world: int
    device: torch.device

    def latest_state(self) -> dict[str, Any] | None: ...

    def prepare(self, model: Any) -> Any: ...

    def report(self, metrics: dict[str, Any], state: dict[str, Any] | None) -> None: ...


class LocalSession:
    """One in-process worker, checkpointing to `<storage>/<name>/checkpoint_<epoch>/` on a local filesystem (for
    machines without Ray; the Ray path is the default)."""

    rank, world = 0, 1

    def __init__(self, root: Path, use_gpu: bool) -> None:
        self.root = root
        self.device = torch.device("cuda" if use_gpu else "cpu")
        self.metrics: dict[str, Any] = {}

    def checkpoints(self) -> list[Path]:
        done = [p for p in self.root.glob("checkpoint_*") if (p / STATE_FILE).is_file()]
        return sorted(done, key=lambda p: int(p.name.split("_")[1]))

    def latest_state(self) -> dict[str, Any] | None:
        done = self.checkpoints()
        return torch.load(done[-1] / STATE_FILE, map_location="cpu", weights_only=False) if done else None

    def prepare(self, model: Any) -> Any:
        return model

    def report(self, metrics: dict[str, Any], state: dict[str, Any] | None) -> None:
        self.metrics = metrics
        if state is not None:
            with atomic_directory(self.root / f"checkpoint_{state['epoch']:06d}", if_exists="replace") as tmp:
                torch.save(state, tmp / STATE_FILE)
            for old in self.checkpoints()[:-2]:
                shutil.rmtree(old, ignore_errors=True)


@dataclass
class _Trainer:
    """The model, optimizer and data of one worker, and where training stands."""

    model: Any
    optimizer: torch.optim.Optimizer
    params: list[torch.Tensor]
    boost: NewRowBoost
    warmup: NewRowWarmup
    dropout: NewTokenDropout
    alignment: NewRowAlignment
    examples: list[tuple[list[int], list[int]]]
    pad_id: int
    epoch: int = 0
    step: int = 0
    resumed_from: int | None = None
    losses: list[float] = field(default_factory=list)
    aligned: dict[str, Any] | None = None  # the alignment's steps and KL before and after (None: it did not run)


def _setup(cfg: LoopConfig, session: Session) -> _Trainer:
    """Build the model and optimizer, resume from the session's latest checkpoint, encode the rows. The model is not
    yet handed to the session (`Session.prepare`): the alignment runs on each worker's own copy first."""
    torch.manual_seed(cfg.seed)
    model, tokenizer = build_model(cfg, session.device)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    token_rows = [p for n, p in named if "trainable_tokens_delta" in n]
    groups = [{"params": [p for n, p in named if "trainable_tokens_delta" not in n], "lr": cfg.lr}]
    if token_rows:
        groups.append({"params": token_rows, "lr": cfg.lr * cfg.new_token_lr_mult})
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    # LoRA gives the new rows their own parameter group above; full fine-tuning scales their step instead
    new_ids = new_token_ids(tokenizer)
    boost = NewRowBoost(model, new_ids if cfg.full else [], cfg.new_token_lr_mult)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    warmup = NewRowWarmup(model, new_ids, cfg.full)
    dropout = NewTokenDropout(tokenizer, new_ids, cfg.new_token_dropout)
    alignment = NewRowAlignment(tokenizer, new_ids, model.get_input_embeddings().weight.shape[0])
    examples = encode_rows(tokenizer, cfg.rows, cfg.max_length)
    trainer = _Trainer(model, optimizer, [p for _, p in named], boost, warmup, dropout, alignment, examples, pad_id)
    state = session.latest_state()
    if state is not None:
        load_trainable_state(model, state["model"], cfg.full)
        optimizer.load_state_dict(state["optimizer"])
        trainer.epoch = trainer.resumed_from = state["epoch"]
        trainer.step = state["step"]
        trainer.aligned = state.get("aligned")
        logger.info(
            "rank %d: resumed from checkpoint after epoch %d (step %d)", session.rank, state["epoch"], state["step"]
        )
    return trainer


def _step(t: _Trainer, cfg: LoopConfig, session: Session, batch_idx: list[int], warmup: bool = False) -> float:
    """One optimizer step on the worker's share of a global batch (warm-up: the new rows alone, no dropout)."""
    use_bf16 = cfg.bf16 and session.device.type == "cuda"
    examples = [t.examples[j] for j in batch_idx]
    if t.dropout.active and not warmup:
        rng = random.Random(f"{cfg.seed}-{t.step}-{session.rank}")  # a resumed run draws the same spellings
        examples = [t.dropout.apply(e, rng, cfg.max_length) for e in examples]
    batch = {k: v.to(session.device) for k, v in _collate(examples, t.pad_id).items()}
    with torch.autocast(session.device.type, dtype=torch.bfloat16, enabled=use_bf16):
        loss = t.model(**batch).loss
    loss.backward()
    if warmup:
        t.warmup.mask_gradients()
    torch.nn.utils.clip_grad_norm_([p for p in t.params if p.grad is not None], 1.0)
    t.boost.before_step()
    t.optimizer.step()
    t.boost.after_step()
    t.optimizer.zero_grad(set_to_none=True)
    return loss.item()


def _batches(t: _Trainer, cfg: LoopConfig, session: Session, seed: int) -> list[list[int]]:
    """The worker's share of every global batch of one shuffled pass over the rows."""
    order = list(range(len(t.examples)))
    random.Random(seed).shuffle(order)
    steps = max(1, len(t.examples) // cfg.batch_size)
    return [order[i * cfg.batch_size : (i + 1) * cfg.batch_size][session.rank :: session.world] for i in range(steps)]


def _pre_schedule_batches(t: _Trainer, cfg: LoopConfig, session: Session, steps: int, seed: int) -> list[list[int]]:
    """`steps` batches for steps before the schedule: shuffled passes over the rows, each pass seeded `seed - k`
    where k counts the batches drawn before it (so they never repeat the schedule's own epochs)."""
    batches: list[list[int]] = []
    while len(batches) < steps:
        batches += _batches(t, cfg, session, seed=seed - len(batches))
    return batches[:steps]


def _align_new_rows(t: _Trainer, cfg: LoopConfig, session: Session) -> None:
    """`new_token_align_steps` steps of `NewRowAlignment` on the new rows alone, with their own Adam, before the
    schedule (not on resume). Each worker takes its share of every batch; with several workers the rows' gradients
    are averaged, so every copy stays the same."""
    if not cfg.new_token_align_steps or not t.warmup.active or t.step > 0:
        return
    import torch.distributed as dist

    rows = [p for p, _ in t.warmup.keep]
    optimizer = torch.optim.Adam(rows, lr=cfg.new_token_align_lr)
    averaged = session.world > 1 and dist.is_available() and dist.is_initialized()
    batches = _pre_schedule_batches(t, cfg, session, cfg.new_token_align_steps, seed=cfg.seed * 1000 - 101)
    losses = []
    for batch_idx in tqdm(batches, desc="aligning new rows", disable=session.rank != 0 or not cfg.progress):
        loss = t.alignment.loss(t.model, [t.examples[j][0] for j in batch_idx], t.pad_id, session.device)
        loss.backward()
        t.warmup.mask_gradients()
        for p in rows:
            if averaged and p.grad is not None:
                dist.all_reduce(p.grad, op=dist.ReduceOp.AVG)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    head, tail = losses[: max(1, len(losses) // 8)], losses[-max(1, len(losses) // 8) :]
    t.aligned = {"steps": len(losses), "kl_first": sum(head) / len(head), "kl_last": sum(tail) / len(tail)}
    logger.info(
        "rank %d: %d alignment steps on the new rows, KL per position %.4f -> %.4f",
        session.rank,
        len(losses),
        t.aligned["kl_first"],
        t.aligned["kl_last"],
    )


def _warm_up_new_rows(t: _Trainer, cfg: LoopConfig, session: Session) -> None:
    """`new_token_warmup_steps` steps on the new tokens' rows alone, before the schedule (not on resume)."""
    if not cfg.new_token_warmup_steps or not t.warmup.active or t.step > 0:
        return
    batches = _pre_schedule_batches(t, cfg, session, cfg.new_token_warmup_steps, seed=cfg.seed * 1000 - 1)
    losses = [_step(t, cfg, session, b, warmup=True) for b in batches]
    logger.info(
        "rank %d: %d warm-up steps on the new rows, loss %.4f -> %.4f", session.rank, len(losses), losses[0], losses[-1]
    )


def _train_epoch(t: _Trainer, cfg: LoopConfig, session: Session, max_steps: int) -> None:
    """One pass over the shuffled rows (each worker takes its share of every global batch)."""
    t.losses = []
    batches = _batches(t, cfg, session, seed=cfg.seed * 1000 + t.epoch)
    for batch_idx in tqdm(batches, desc=f"epoch {t.epoch + 1}", disable=session.rank != 0 or not cfg.progress):
        if t.step >= max_steps:
            break
        t.losses.append(_step(t, cfg, session, batch_idx))
        t.step += 1
    t.epoch += 1


def run_training(cfg: LoopConfig, session: Session, after_epoch: EpochHook | None = None) -> None:
    """Resume from the latest checkpoint, train, checkpoint each epoch (and at max_steps)."""
    t = _setup(cfg, session)
    max_steps = cfg.max_steps or max(1, len(t.examples) // cfg.batch_size) * cfg.epochs
    t.model.train()
    _align_new_rows(t, cfg, session)
    t.model = session.prepare(t.model)
    _warm_up_new_rows(t, cfg, session)
    while t.epoch < cfg.epochs and t.step < max_steps:
        t0 = time.perf_counter()
        _train_epoch(t, cfg, session, max_steps)
        metrics = {
            "epoch": t.epoch,
            "step": t.step,
            "loss": sum(t.losses) / max(1, len(t.losses)),
            "epoch_seconds": time.perf_counter() - t0,
            "resumed_from_epoch": t.resumed_from,
        }
        state = None
        if session.rank == 0:
            inner = t.model.module if hasattr(t.model, "module") else t.model
            state = {
                "model": trainable_state(inner, cfg.full),
                "optimizer": t.optimizer.state_dict(),
                "epoch": t.epoch,
                "step": t.step,
                "aligned": t.aligned,
            }
        session.report(metrics, state)
        logger.info("rank %d: epoch %d step %d loss %.4f", session.rank, t.epoch, t.step, metrics["loss"])
        if after_epoch is not None:
            after_epoch(t.epoch, t.resumed_from)


# ----------------------------------------------------------------------------------------------------------------
# Training locally, and the result
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class TrainOutcome:
    """What a finished training run leaves: its last metrics, the latest checkpoint and its state."""

    metrics: dict[str, Any]
    checkpoint: str
    state: dict[str, Any]
    use_gpu: bool
    backend: str


def train_local(
    cfg: FinetuneConfig, loop: LoopConfig, storage: str, name: str, after_epoch: EpochHook | None = None
) -> TrainOutcome:
    """One in-process worker, checkpointing under `<storage>/<name>/` (local storage only)."""
    if "://" in storage:
        raise FinetuneError("the local trainer checkpoints to a local storage path only; use the Ray trainer")
    use_gpu, backend = select_gpu(cfg.use_gpu)
    session = LocalSession(Path(storage) / name, use_gpu)
    run_training(loop, session, after_epoch)
    return TrainOutcome(session.metrics, str(session.checkpoints()[-1]), session.latest_state(), use_gpu, backend)


def save_merged(
    loop: LoopConfig, trained: dict[str, torch.Tensor], out: Path, summary: dict[str, Any], device: str = "cpu"
) -> None:
    """Rebuild the model, load the trained state, merge LoRA, save a plain HF directory aside and move it in."""
    model, tokenizer = build_model(loop, device)
    load_trainable_state(model, trained, loop.full)
    if not loop.full:
        model = model.merge_and_unload()
    model = model.to("cpu")
    with atomic_directory(out, last=SUMMARY_FILE) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / SUMMARY_FILE).write_text(json.dumps(summary, indent=2, default=str))
    logger.info("saved the fine-tuned model to %s", out)
