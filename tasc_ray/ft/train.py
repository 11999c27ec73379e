"""TASC-ft fine-tuning on Ray Train: teach a model (usually one with an enriched vocabulary) to emit its outputs.

`finetune(FinetuneConfig(...))` runs a `TorchTrainer` with `ScalingConfig(num_workers, use_gpu)` (gloo on CPU,
nccl on GPU). The loss covers output tokens only (prompt positions are labelled -100). Two recipes:

* LoRA (default, peft): adapters on every linear layer of the blocks, plus the embedding rows of the tokenizer's
  added (non-special) tokens trainable through peft's `trainable_token_indices` (tied LM heads follow).
* Full fine-tuning (`full=True`): every parameter.

Each epoch ends with a checkpoint (the trainable state and the optimizer) reported to the run's `storage_path`
(a local directory or `s3://...`). A run restarted with the same storage path and name resumes from the latest
checkpoint: Ray Train v2 restores the run's checkpoint state from storage, and workers pick it up through
`ray.train.get_checkpoint()`; `max_failures` retries worker failures the same way. The final weights are
merged (`merge_and_unload` for LoRA) and saved as a plain Hugging Face directory, written aside and renamed
into place, so a half-written output never looks complete.

`trainer="local"` runs the same loop in-process (one worker, local checkpoints, same resume logic) for machines
without Ray, e.g. a bare GPU box; the Ray path is the default and the one the CLI and jobs use.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

STATE_FILE = "state.pt"
SUMMARY_FILE = "finetune.json"
LORA_TARGETS = "all-linear"


class FinetuneError(ValueError):
    """Bad fine-tuning input: missing columns, empty data, no GPU for --use-gpu, an unusable model directory."""


@dataclass
class FinetuneConfig:
    model: str
    train: str  # .parquet, .jsonl or .csv with a prompt and an output column
    out: str
    prompt_column: str = "prompt"
    output_column: str = "output"
    epochs: int = 3
    lr: float | None = None  # default: 2e-4 for LoRA, 5e-5 for full fine-tuning
    lora_r: int = 16
    lora_alpha: int | None = None  # default 2 * lora_r
    new_token_lr_mult: float = 1.0  # learning-rate multiplier for the new tokens' embedding rows (LoRA and full)
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
    fail_after_epoch: int | None = None  # fault injection for tests: raise once after this epoch's checkpoint
    trainer: str = "ray"  # "ray" (TorchTrainer) or "local" (one in-process worker, for machines without Ray)
    progress: bool = False  # tqdm over steps on rank 0

    def resolved_lr(self) -> float:
        return self.lr if self.lr is not None else (5e-5 if self.full else 2e-4)


def read_pairs(path: str | Path, prompt_column: str, output_column: str) -> list[dict[str, str]]:
    """Rows of {"prompt", "output"} from a .parquet, .jsonl or .csv file, with clear errors on bad input."""
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise FinetuneError(f"training file not found: {path}")
    suffix = path.suffix.lower()
    try:
        if suffix == ".parquet":
            df = pd.read_parquet(path)
        elif suffix in (".jsonl", ".ndjson"):
            df = pd.read_json(path, lines=True)
        elif suffix == ".csv":
            df = pd.read_csv(path)
        else:
            raise FinetuneError(f"{path}: unsupported training file type {suffix!r} (use .parquet, .jsonl or .csv)")
    except FinetuneError:
        raise
    except Exception as exc:
        raise FinetuneError(f"{path} cannot be read: {exc}") from exc
    for col in (prompt_column, output_column):
        if col not in df.columns:
            raise FinetuneError(f"{path} has no column {col!r}; columns: {', '.join(map(str, df.columns))}")
    rows = [
        {"prompt": p, "output": o}
        for p, o in zip(df[prompt_column], df[output_column])
        if isinstance(p, str) and isinstance(o, str) and p and o
    ]
    if not rows:
        raise FinetuneError(f"{path}: no rows with a non-empty {prompt_column!r} and {output_column!r} (empty data)")
    if len(rows) < len(df):
        logger.warning("%s: skipped %d rows with an empty prompt or output", path, len(df) - len(rows))
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


def _lora_config(cfg: dict[str, Any], new_ids: list[int]) -> Any:
    from peft import LoraConfig

    return LoraConfig(
        r=cfg["lora_r"],
        lora_alpha=cfg["lora_alpha"] or 2 * cfg["lora_r"],
        lora_dropout=0.0,
        target_modules=LORA_TARGETS,
        task_type="CAUSAL_LM",
        trainable_token_indices={"embed_tokens": new_ids} if new_ids else None,
    )


def build_model(cfg: dict[str, Any], device: torch.device | str = "cpu") -> tuple[Any, Any]:
    """The model to train (base + LoRA, or the base itself for full fine-tuning) and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(cfg["model_path"])
    model = AutoModelForCausalLM.from_pretrained(cfg["model_path"], dtype=torch.float32)
    if not cfg["full"]:
        from peft import get_peft_model

        model = get_peft_model(model, _lora_config(cfg, new_token_ids(tokenizer)))
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


class _RaySession:
    """The worker's view of a Ray Train run."""

    def __init__(self) -> None:
        import ray.train
        import ray.train.torch

        self._train, self._torch = ray.train, ray.train.torch
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()

    def latest_state(self) -> dict[str, Any] | None:
        checkpoint = self._train.get_checkpoint()
        if checkpoint is None:
            return None
        with checkpoint.as_directory() as d:
            return torch.load(Path(d) / STATE_FILE, map_location="cpu", weights_only=False)

    def prepare(self, model: Any) -> Any:
        return self._torch.prepare_model(model)

    def report(self, metrics: dict[str, Any], state: dict[str, Any] | None) -> None:
        from ray.train import Checkpoint

        with tempfile.TemporaryDirectory() as d:
            ckpt = None
            if state is not None:
                torch.save(state, Path(d) / STATE_FILE)
                ckpt = Checkpoint.from_directory(d)
            self._train.report(metrics, checkpoint=ckpt)


class _LocalSession:
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
            final = self.root / f"checkpoint_{state['epoch']:06d}"
            tmp = self.root / f".tmp_{final.name}"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            torch.save(state, tmp / STATE_FILE)
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
            for old in self.checkpoints()[:-2]:
                shutil.rmtree(old, ignore_errors=True)


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
        self.matrices = [model.get_input_embeddings().weight]
        head = model.get_output_embeddings()
        if head is not None and head.weight is not self.matrices[0]:
            self.matrices.append(head.weight)
        self.ids = torch.tensor(new_ids, dtype=torch.long, device=self.matrices[0].device)

    def before_step(self) -> None:
        self.before = [w.detach()[self.ids] for w in self.matrices]  # advanced indexing copies

    @torch.no_grad()
    def after_step(self) -> None:
        for w, old in zip(self.matrices, self.before):
            w[self.ids] = old + (w[self.ids] - old) * self.mult


def train_loop(cfg: dict[str, Any]) -> None:
    """The per-worker loop (Ray Train entry point)."""
    run_training(cfg, _RaySession())


def run_training(cfg: dict[str, Any], session: Any) -> None:
    """Resume from the latest checkpoint, train, checkpoint each epoch (and at max_steps)."""
    rank, world, device = session.rank, session.world, session.device
    torch.manual_seed(cfg["seed"])
    model, tokenizer = build_model(cfg, device)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    token_rows = [p for n, p in named if "trainable_tokens_delta" in n]
    others = [p for n, p in named if "trainable_tokens_delta" not in n]
    groups = [{"params": others, "lr": cfg["lr"]}]
    if token_rows:
        groups.append({"params": token_rows, "lr": cfg["lr"] * cfg.get("new_token_lr_mult", 1.0)})
    optimizer = torch.optim.AdamW(groups, lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    # LoRA gives the new rows their own parameter group above; full fine-tuning scales their step instead
    boost = NewRowBoost(model, new_token_ids(tokenizer) if cfg["full"] else [], cfg.get("new_token_lr_mult", 1.0))
    start_epoch, step = 0, 0
    state = session.latest_state()
    if state is not None:
        load_trainable_state(model, state["model"], cfg["full"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch, step = state["epoch"], state["step"]
        logger.info("rank %d: resumed from checkpoint after epoch %d (step %d)", rank, start_epoch, step)
    resumed_from = start_epoch if state is not None else None
    del state
    model = session.prepare(model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    examples = encode_rows(tokenizer, cfg["rows"], cfg["max_length"])
    global_bs = cfg["batch_size"]
    steps_per_epoch = max(1, len(examples) // global_bs)
    max_steps = cfg["max_steps"] or steps_per_epoch * cfg["epochs"]
    use_bf16 = cfg["bf16"] and device.type == "cuda"
    model.train()
    for epoch in range(start_epoch, cfg["epochs"]):
        if step >= max_steps:
            break
        order = list(range(len(examples)))
        random.Random(cfg["seed"] * 1000 + epoch).shuffle(order)
        losses = []
        t0 = time.perf_counter()
        for i in tqdm(
            range(steps_per_epoch), desc=f"epoch {epoch + 1}", disable=rank != 0 or not cfg.get("progress", False)
        ):
            if step >= max_steps:
                break
            batch_idx = order[i * global_bs : (i + 1) * global_bs][rank::world]
            batch = {k: v.to(device) for k, v in _collate([examples[j] for j in batch_idx], pad_id).items()}
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            boost.before_step()
            optimizer.step()
            boost.after_step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            step += 1
        metrics = {
            "epoch": epoch + 1,
            "step": step,
            "loss": sum(losses) / max(1, len(losses)),
            "epoch_seconds": time.perf_counter() - t0,
            "resumed_from_epoch": resumed_from,
        }
        state = None
        if rank == 0:
            inner = model.module if hasattr(model, "module") else model
            state = {
                "model": trainable_state(inner, cfg["full"]),
                "optimizer": optimizer.state_dict(),
                "epoch": epoch + 1,
                "step": step,
            }
        session.report(metrics, state)
        logger.info("rank %d: epoch %d step %d loss %.4f", rank, epoch + 1, step, metrics["loss"])
        if cfg["fail_after_epoch"] == epoch + 1 and resumed_from is None:
            raise RuntimeError(f"injected failure after epoch {epoch + 1} (fail_after_epoch)")


def _storage(cfg: FinetuneConfig) -> tuple[str, str]:
    out = Path(cfg.out).expanduser().resolve()
    storage = cfg.storage_path or str(out.parent / f"{out.name}.ray")
    if "://" not in storage:
        storage = str(Path(storage).expanduser().resolve())
    return storage, cfg.name or f"finetune-{out.name}"


def finetune(cfg: FinetuneConfig) -> dict[str, Any]:
    """Fine-tune (Ray Train by default) and save the merged model to cfg.out. Returns a summary dict."""
    from tasc_ray.models import ModelNotFoundError, load_tokenizer, resolve_model

    if cfg.epochs <= 0:
        raise FinetuneError(f"epochs must be positive, got {cfg.epochs}")
    if cfg.max_steps is not None and cfg.max_steps <= 0:
        raise FinetuneError(f"max_steps must be positive, got {cfg.max_steps}")
    if cfg.num_workers < 1 or cfg.batch_size < cfg.num_workers:
        raise FinetuneError(
            f"need num_workers >= 1 and batch_size >= num_workers "
            f"(got {cfg.num_workers} workers, batch {cfg.batch_size})"
        )
    if cfg.trainer not in ("ray", "local"):
        raise FinetuneError(f"trainer must be 'ray' or 'local', got {cfg.trainer!r}")
    out = Path(cfg.out).expanduser().resolve()
    if out.exists() and any(out.iterdir()):
        raise FinetuneError(f"output directory {out} exists and is not empty")
    rows = read_pairs(cfg.train, cfg.prompt_column, cfg.output_column)
    model_path = resolve_model(cfg.model)
    try:
        load_tokenizer(model_path)
    except ModelNotFoundError as exc:
        raise FinetuneError(f"{cfg.model}: cannot load a tokenizer ({exc})") from exc
    storage, name = _storage(cfg)
    loop_cfg = {
        "model_path": model_path,
        "rows": rows,
        "full": cfg.full,
        "lora_r": cfg.lora_r,
        "lora_alpha": cfg.lora_alpha,
        "lr": cfg.resolved_lr(),
        "epochs": cfg.epochs,
        "max_steps": cfg.max_steps,
        "batch_size": cfg.batch_size,
        "max_length": cfg.max_length,
        "weight_decay": cfg.weight_decay,
        "seed": cfg.seed,
        "bf16": cfg.bf16,
        "fail_after_epoch": cfg.fail_after_epoch,
        "progress": cfg.progress,
        "new_token_lr_mult": cfg.new_token_lr_mult,
    }
    logger.info(
        "fine-tuning %s (%s) on %d rows with %d worker(s) (%s trainer); run %s in %s",
        cfg.model,
        "full" if cfg.full else f"LoRA r={cfg.lora_r}",
        len(rows),
        cfg.num_workers,
        cfg.trainer,
        name,
        storage,
    )
    t0 = time.perf_counter()
    if cfg.trainer == "local":
        if "://" in storage:
            raise FinetuneError("the local trainer checkpoints to a local storage path only; use the Ray trainer")
        use_gpu, backend = select_gpu(cfg.use_gpu)
        session = _LocalSession(Path(storage) / name, use_gpu)
        run_training(loop_cfg, session)
        metrics, checkpoint_path = session.metrics, str(session.checkpoints()[-1])
        state = session.latest_state()
    else:
        metrics, checkpoint_path, state, use_gpu, backend = _fit_ray(cfg, loop_cfg, storage, name)
    train_s = time.perf_counter() - t0
    summary = {
        "model": cfg.model,
        "out": str(out),
        "run_name": name,
        "storage_path": storage,
        "trainer": cfg.trainer,
        "recipe": "full" if cfg.full else "lora",
        "rows": len(rows),
        "epochs_done": state["epoch"],
        "steps": state["step"],
        "final_loss": metrics.get("loss"),
        "resumed_from_epoch": metrics.get("resumed_from_epoch"),
        "train_seconds": round(train_s, 2),
        "backend": backend,
        "use_gpu": use_gpu,
        "num_workers": cfg.num_workers,
        "checkpoint": checkpoint_path,
        "config": asdict(cfg),
    }
    save_merged(loop_cfg, state["model"], out, summary, "cuda" if use_gpu else "cpu")
    return summary


def _storage_filesystem(storage: str) -> tuple[Any, str]:
    """(pyarrow filesystem or None, path) for RunConfig. For s3:// with AWS_ENDPOINT_URL set in this process (an S3
    compatible store, e.g. MinIO), the endpoint and credentials are passed explicitly: Ray Train's controller
    actor runs in the cluster's environment, which need not carry this process's variables."""
    env = os.environ
    if not storage.startswith("s3://") or not env.get("AWS_ENDPOINT_URL"):
        return None, storage
    import pyarrow.fs as pafs

    kwargs: dict[str, Any] = {
        "endpoint_override": env["AWS_ENDPOINT_URL"],
        "region": env.get("AWS_DEFAULT_REGION", env.get("AWS_REGION", "us-east-1")),
    }
    if env.get("AWS_ACCESS_KEY_ID") and env.get("AWS_SECRET_ACCESS_KEY"):
        kwargs.update(
            access_key=env["AWS_ACCESS_KEY_ID"],
            secret_key=env["AWS_SECRET_ACCESS_KEY"],
            session_token=env.get("AWS_SESSION_TOKEN"),
        )
    if env["AWS_ENDPOINT_URL"].startswith("http://"):
        kwargs["scheme"] = "http"
    return pafs.S3FileSystem(**kwargs), storage[len("s3://") :]


def _fit_ray(
    cfg: FinetuneConfig, loop_cfg: dict[str, Any], storage: str, name: str
) -> tuple[dict[str, Any], str, dict[str, Any], bool, str]:
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from tasc_ray.stages.runtime import ensure_ray

    ensure_ray()
    use_gpu, backend = select_gpu(cfg.use_gpu, ray.cluster_resources().get("GPU", 0.0) if cfg.use_gpu else None)
    cpus = cfg.cpus_per_worker or max(1.0, math.floor(ray.available_resources().get("CPU", 1.0) / cfg.num_workers))
    storage_fs, storage_path = _storage_filesystem(storage)
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=loop_cfg,
        torch_config=TorchConfig(backend=backend),
        scaling_config=ScalingConfig(
            num_workers=cfg.num_workers, use_gpu=use_gpu, resources_per_worker=None if use_gpu else {"CPU": cpus}
        ),
        run_config=RunConfig(
            name=name,
            storage_path=storage_path,
            storage_filesystem=storage_fs,
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"run {name} finished without a checkpoint")
    with result.checkpoint.as_directory() as d:
        state = torch.load(Path(d) / STATE_FILE, map_location="cpu", weights_only=False)
    return dict(result.metrics or {}), result.checkpoint.path, state, use_gpu, backend


def save_merged(
    loop_cfg: dict[str, Any], trained: dict[str, torch.Tensor], out: Path, summary: dict[str, Any], device: str = "cpu"
) -> None:
    """Rebuild the model, load the trained state, merge LoRA, save a plain HF directory aside and rename it."""
    model, tokenizer = build_model(loop_cfg, device)
    load_trainable_state(model, trained, loop_cfg["full"])
    if not loop_cfg["full"]:
        model = model.merge_and_unload()
    model = model.to("cpu")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / SUMMARY_FILE).write_text(json.dumps(summary, indent=2, default=str))
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("saved the fine-tuned model to %s", out)
