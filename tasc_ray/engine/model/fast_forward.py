"""A lean forward pass for Llama-family decoders (Llama, Mistral, Qwen2): the engine's fast path.

Decoding runs a few query tokens per row through a small model, and there transformers' general forward spends
as much time around the matrix products as in them: seven separate projections per layer, a key/value
`torch.cat` of the whole cache per layer and step, `repeat_kv` copies of the cache for every multi-token query,
and per-call bookkeeping. This forward computes the same function from the same weights with:

- fused products: one [q; k; v] and one [gate; up] product per layer; for float32 on CPU, on the engine's own
  kernel (cpu_kernels.py: weights packed in panels, streamed at the memory's speed for one or two rows and
  register-blocked for the tens of rows of a verification pass), else on oneDNN-packed weights;
- only real tokens through the products: the padding of rows with shorter drafts (or prompts) is dropped before
  every product and restored only around attention, so a pass costs what its tokens cost, not rows x longest;
- keys and values appended in place to a per-layer buffer with headroom, instead of a copy per step;
- grouped-query attention on the key/value heads directly;
- with the CPU kernels, attention, RMS norm and SiLU on them too (kernels/attention.c), and rotary angles from a
  table built once: then every op of the pass is batch-invariant, so a row's logits do not depend on its batch
  neighbours, its padding, or how many query tokens its pass carries, and speculative decoding is exactly plain
  decoding at every precision (`batch_invariant`).

The model stays the source of truth: the weights are read from it (its parameters, `save_pretrained` and tied
embeddings untouched), its own rotary module computes positions, and `build_fast_forward` checks the fast path
against the model's forward on a small input before using it. A model it does not support, or that fails the
check, keeps the model's own forward, and the log says why. Results are within float rounding of the model's
forward (another summation order), not bit-identical to it.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache, PreTrainedModel

from tasc_ray.engine.kv_cache import PrefixKV, additive_mask, allowed_slots, attention_mask
from tasc_ray.engine.model.cpu_kernels import PRECISIONS, CpuKernels, PanelWeight, load_kernels

logger = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
_HEADROOM = 64  # cache slots allocated beyond need, so a buffer is reallocated every ~64 tokens, not every step


class FusedLinear:
    """x @ [W_1; W_2; ...]^T + b for several nn.Linear layers that read the same input, as one product.

    How the product runs: `kernel` (float32 on CPU, the built kernels of cpu_kernels.py) on the weight packed in
    its panels; `packed` on a oneDNN-packed copy (float32 on CPU without the kernel); `dense` (other devices and
    dtypes) is F.linear on the concatenated weight."""

    def __init__(self, layers: list[nn.Linear], mode: str, precision: str = "fp32") -> None:
        weight = torch.cat([m.weight.detach() for m in layers]) if len(layers) > 1 else layers[0].weight.detach()
        biases = [m.bias.detach() if m.bias is not None else None for m in layers]
        if all(b is None for b in biases):
            self.bias = None
        else:
            zeros = [weight.new_zeros(m.out_features) for m in layers]
            self.bias = torch.cat([b if b is not None else z for b, z in zip(biases, zeros)])
        self.sizes = [m.out_features for m in layers]
        self.kernel = load_kernels() if mode == "kernel" else None
        if self.kernel is not None:
            self.weight: torch.Tensor | PanelWeight = self.kernel.pack(weight, self.bias, precision)
        elif mode == "packed":
            self.weight = torch.ops.mkldnn._reorder_linear_weight(weight, 1)
        else:
            self.weight = weight
        self.mode = mode

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel is not None:
            return self.kernel(x, self.weight)  # type: ignore[arg-type]
        if self.mode == "packed":
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)  # type: ignore[arg-type]


class _Layer:
    def __init__(self, layer: Any, mode: str, precision: str) -> None:  # a decoder layer of the Llama module layout
        attn, mlp = layer.self_attn, layer.mlp
        self.qkv = FusedLinear([attn.q_proj, attn.k_proj, attn.v_proj], mode, precision)
        self.o = FusedLinear([attn.o_proj], mode, precision)
        self.gate_up = FusedLinear([mlp.gate_proj, mlp.up_proj], mode, precision)
        self.down = FusedLinear([mlp.down_proj], mode, precision)
        self.norm1 = _norm_params(layer.input_layernorm)
        self.norm2 = _norm_params(layer.post_attention_layernorm)


def _norm_params(norm: Any) -> tuple[torch.Tensor, float]:
    return norm.weight.detach(), float(norm.variance_epsilon)


def _rms_norm(x: torch.Tensor, norm: tuple[torch.Tensor, float]) -> torch.Tensor:
    weight, eps = norm
    if x.dtype == torch.float32:  # one op instead of five; measured bit-identical to LlamaRMSNorm in float32
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    h = x.to(torch.float32)  # LlamaRMSNorm: normalise in float32, scale in the model's dtype
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def append_kv(layer: Any, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Append [B, H, q, D] keys and values to a DynamicCache layer, in place in a buffer the layer owns, and
    return all of its keys and values. The layer's `keys`/`values` stay views of the buffer, so everything
    that edits a DynamicCache (crop, row selection, compaction, concatenation) works as before; a layer whose
    tensors were replaced by such an edit gets a new buffer at its next append."""
    old_k = layer.keys if getattr(layer, "is_initialized", False) else None
    n, q = (0 if old_k is None or old_k.numel() == 0 else old_k.shape[2]), keys.shape[2]
    buffers = getattr(layer, "_tasc_kv", None)
    if buffers is None or n + q > buffers[0].shape[2] or not _is_head_of(old_k, buffers[0], n):
        b, h, _, d = keys.shape
        kbuf = keys.new_empty(b, h, n + q + _HEADROOM, d)
        vbuf = values.new_empty(b, values.shape[1], n + q + _HEADROOM, values.shape[3])
        if old_k is not None and n:
            kbuf[:, :, :n] = old_k
            vbuf[:, :, :n] = layer.values
        buffers = (kbuf, vbuf)
        layer._tasc_kv = buffers
    kbuf, vbuf = buffers
    kbuf[:, :, n : n + q] = keys
    vbuf[:, :, n : n + q] = values
    layer.keys, layer.values = kbuf[:, :, : n + q], vbuf[:, :, : n + q]
    layer.is_initialized = True
    if getattr(layer, "device", None) is None:
        layer.device = keys.device
    return layer.keys, layer.values


def _is_head_of(t: torch.Tensor | None, buffer: torch.Tensor, n: int) -> bool:
    """Whether `t` is the first n slots of `buffer` (not a tensor some cache edit put in its place)."""
    if t is None or n == 0:
        return t is None or t.numel() == 0
    return (
        t.data_ptr() == buffer.data_ptr()
        and t.shape[:2] == buffer.shape[:2]
        and t.stride() == buffer.stride()
        and t.shape[2] == n
    )


class FastForward:
    """Logits of a Llama-family model for decoding-shaped inputs, computed lean (see the module docstring)."""

    def __init__(self, model: PreTrainedModel, use_kernel: bool = True, precision: str = "fp32") -> None:
        """`precision`: what the products run in (PRECISIONS); anything but fp32 needs the CPU kernel to support
        it here, else a ValueError that says what is supported."""
        cfg = model.config
        first = next(model.parameters())
        cpu_fp32 = first.device.type == "cpu" and first.dtype == torch.float32 and torch.backends.mkldnn.is_available()
        kernels = load_kernels() if use_kernel and cpu_fp32 else None
        self.mode = "kernel" if kernels is not None else "packed" if cpu_fp32 else "dense"
        check_precision(precision, self.mode)
        self.precision = precision
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        sizes = (cfg.hidden_size, cfg.intermediate_size, self.head_dim)
        self.ops: CpuKernels | None = kernels if kernels is not None and kernels.supports_model(*sizes) else None

        self.embed = model.get_input_embeddings()
        # One table of rotary angles for every position, so a position's angles never depend on the pass.
        every = torch.arange(cfg.max_position_embeddings, device=first.device)[None]
        cos, sin = model.model.rotary_emb(first.new_zeros(1, dtype=first.dtype), every)
        self.cos, self.sin = cos[0], sin[0]  # [positions, D]
        self.layers = [_Layer(layer, self.mode, precision) for layer in model.model.layers]
        self.final_norm = _norm_params(model.model.norm)
        self.lm_head = FusedLinear([model.get_output_embeddings()], self.mode, precision)
        self.n_heads, self.n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
        self.scaling = model.model.layers[0].self_attn.scaling
        self.dtype = first.dtype

    @property
    def batch_invariant(self) -> bool:
        """Whether every op of the pass runs on the batch-invariant CPU kernels (a row's logits then do not
        depend on its batch, padding or query count)."""
        return self.ops is not None

    @torch.inference_mode()
    def __call__(
        self,
        ids: torch.Tensor,
        valid: torch.Tensor,
        positions: torch.Tensor,
        cache: DynamicCache,
        last_only: bool = False,
        tree: torch.Tensor | None = None,
        prefix: PrefixKV | None = None,
        prefix_seen: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """[B, q, V] logits ([B, 1, V] with `last_only`: the last column's) of `ids` [B, q] at `positions`, which
        occupy the last q slots of `valid` [B, S] (the mask over all cache slots); the new keys and values are
        appended to `cache`. Query slots masked in `valid` are padding: they skip the products and the attention,
        their cache slots hold zeros and their logits are left unset (never read). `tree` [B, q, q]: which new
        slots each query sees (a token tree; default causal). `prefix`: keys and values of a prompt prefix stored
        once, of which row b sees the first `prefix_seen[b]` slots before its own (the batch-invariant kernels
        only: `batch_invariant`)."""
        if prefix is not None and self.ops is None:
            raise ValueError("a shared prefix needs the batch-invariant CPU kernels")
        b, q = ids.shape
        h, kv, d = self.n_heads, self.n_kv, self.head_dim
        real = valid[:, -q:]
        flat = None if bool(real.all()) else real.reshape(-1).nonzero().squeeze(1)  # indices of real query tokens
        x = self.embed(ids).reshape(b * q, -1)
        if flat is not None:
            x = x[flat]
        at = positions.reshape(-1) if flat is None else positions.reshape(-1)[flat]
        cos, sin = self.cos[at][:, None, :], self.sin[at][:, None, :]  # [T, 1, D]
        allowed = allowed_slots(valid, q, tree)
        mask = None
        if self.ops is None:
            mask = _grouped_mask(additive_mask(allowed, self.dtype), h // kv)
        else:
            if prefix is not None:
                allowed = torch.cat([prefix.seen_mask(prefix_seen, q), allowed], dim=-1)  # type: ignore[arg-type]
            if flat is not None:  # padding queries see nothing: attention skips them (their outputs are dropped)
                allowed = allowed & real[:, :, None]
            allowed = allowed.to(torch.uint8).contiguous()  # once for every layer
        q_size, kv_size = h * d, kv * d
        for index, layer in enumerate(self.layers):
            qkv = layer.qkv(self._norm(x, layer.norm1))
            qs = qkv[:, :q_size].reshape(-1, h, d)
            ks = qkv[:, q_size : q_size + kv_size].reshape(-1, kv, d)
            vs = qkv[:, q_size + kv_size :].reshape(-1, kv, d)
            qs = qs * cos + _rotate_half(qs) * sin
            ks = ks * cos + _rotate_half(ks) * sin
            # [B, q, heads, D]; the kernels' attention skips padding queries (nothing allowed), so theirs stay unset
            qs = _padded(qs, flat, b, q, zeros=self.ops is None)
            ks, vs = _padded(ks, flat, b, q), _padded(vs, flat, b, q)
            keys, values = append_kv(cache.layers[index], ks.transpose(1, 2), vs.transpose(1, 2))
            if self.ops is not None:
                shared = prefix.layers[index] if prefix is not None else None
                out = self.ops.attention(qs, keys, values, allowed, self.scaling, shared).reshape(b * q, h * d)
            else:  # query heads folded into the query axis per key/value head: [B, kv, (h/kv) * q, D]
                grouped = qs.reshape(b, q, kv, h // kv, d).permute(0, 2, 3, 1, 4).reshape(b, kv, (h // kv) * q, d)
                out = F.scaled_dot_product_attention(grouped, keys, values, attn_mask=mask, scale=self.scaling)
                out = out.reshape(b, kv, h // kv, q, d).permute(0, 3, 1, 2, 4).reshape(b * q, h * d)
            x = x + layer.o(out if flat is None else out[flat])
            x = x + layer.down(self._silu_mul(layer.gate_up(self._norm(x, layer.norm2))))
        if last_only:
            rows = torch.arange(b, device=ids.device) * q + q - 1
            if flat is not None:  # the last column of every row must be real (left-padded prompts are)
                rows = torch.searchsorted(flat, rows)
            return self.lm_head(self._norm(x[rows], self.final_norm)).float()[:, None]
        logits = self.lm_head(self._norm(x, self.final_norm)).float()
        if flat is None:
            return logits.reshape(b, q, -1)
        full = logits.new_empty(b * q, logits.shape[-1])  # padding positions are never read: left unset
        full[flat] = logits
        return full.reshape(b, q, -1)

    def _norm(self, x: torch.Tensor, norm: tuple[torch.Tensor, float]) -> torch.Tensor:
        return self.ops.rms_norm(x, *norm) if self.ops is not None else _rms_norm(x, norm)

    def _silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        if self.ops is not None:
            return self.ops.silu_mul(gate_up)
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up


def _padded(t: torch.Tensor, flat: torch.Tensor | None, b: int, q: int, zeros: bool = True) -> torch.Tensor:
    """[T, heads, D] of the real tokens back to [B, q, heads, D], zeros at the padding (unset without `zeros`)."""
    if flat is None:
        return t.reshape(b, q, *t.shape[1:])
    full = t.new_zeros(b * q, *t.shape[1:]) if zeros else t.new_empty(b * q, *t.shape[1:])
    full[flat] = t
    return full.reshape(b, q, *t.shape[1:])


def _grouped_mask(mask: torch.Tensor, groups: int) -> torch.Tensor:
    """[B, 1, q, S] additive mask -> [B, 1, groups * q, S], the query axis of the folded grouped heads."""
    return mask if groups == 1 else mask.repeat(1, 1, groups, 1)


def supported_precisions(mode: str = "kernel") -> tuple[str, ...]:
    """The products' precisions this machine runs: fp32 always; others on the CPU kernel where the CPU has them."""
    kernels = load_kernels() if mode == "kernel" else None
    return kernels.precisions if kernels is not None else ("fp32",)


def check_precision(precision: str, mode: str = "kernel") -> None:
    """Refuse a precision that is unknown, or that this machine's products cannot run, naming what is supported."""
    supported = supported_precisions(mode)
    if precision not in supported:
        why = (
            f"unknown (known: {', '.join(PRECISIONS)})"
            if precision not in PRECISIONS
            else "not available here (bf16 and int8 need the CPU decoding kernel, a float32 model on the CPU and "
            "AVX512-BF16; w8a8 the same with AVX512-VNNI)"
        )
        raise ValueError(f"precision {precision!r} is {why}; supported on this machine: {', '.join(supported)}")


def unsupported_reason(model: PreTrainedModel) -> str | None:
    """Why the fast path cannot run this model, or None when it can."""
    cfg = model.config
    if cfg.model_type not in SUPPORTED_MODEL_TYPES:
        return f"model type {cfg.model_type!r} (supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
    if getattr(cfg, "hidden_act", "silu") != "silu":
        return f"activation {cfg.hidden_act!r}"
    if (getattr(cfg, "pretraining_tp", 1) or 1) != 1:
        return "pretraining_tp > 1"
    if cfg.model_type == "mistral" and getattr(cfg, "sliding_window", None):
        return "sliding-window attention"
    if cfg.model_type == "qwen2" and getattr(cfg, "use_sliding_window", False):
        return "sliding-window attention"
    if any(t != "full_attention" for t in getattr(cfg, "layer_types", None) or []):
        return "layers other than full attention"
    if model.training:
        return "the model is in training mode"
    inner = getattr(model, "model", None)
    if inner is None or not hasattr(inner, "layers") or not hasattr(inner, "rotary_emb"):
        return f"{type(model).__name__} does not have the Llama module layout"
    if "dynamic" in str(getattr(inner.rotary_emb, "rope_type", "default")):
        return "dynamic rotary scaling (its angles change with the sequence length)"
    for layer in inner.layers:
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        names = ("q_proj", "k_proj", "v_proj", "o_proj")
        if attn is None or mlp is None or any(type(getattr(attn, n, None)) is not nn.Linear for n in names):
            return "attention projections that are not plain nn.Linear (adapters, quantised layers)"
        if any(type(getattr(mlp, n, None)) is not nn.Linear for n in ("gate_proj", "up_proj", "down_proj")):
            return "MLP projections that are not plain nn.Linear (adapters, quantised layers)"
    head = model.get_output_embeddings()
    if type(head) is not nn.Linear:
        return "an output head that is not a plain nn.Linear"
    return None


@torch.inference_mode()
def check_against_model(fast: FastForward, model: PreTrainedModel, tolerance: float | None = None) -> str | None:
    """Run a small ragged batch (a left-padded prefill, then a step with padded drafts) through the model's own
    forward and the fast path; return how they differ, or None when they agree (logits within `tolerance` of the
    logits' scale, default 1e-3 in fp32, 5e-2 in bf16, 1e-1 in int8 and 3e-1 in w8a8, whose inputs are rounded to
    int8 too: SmolLM2-135M's logits differ by up to 4.9e-2 in int8 and 2.0e-1 in w8a8 on this check; and the same
    argmax wherever the model's top two logits are further apart than that)."""
    if tolerance is None:
        tolerance = {"fp32": 1e-3, "bf16": 5e-2, "int8": 1e-1, "w8a8": 3e-1}[fast.precision]
    device = next(model.parameters()).device
    vocab = model.get_output_embeddings().out_features
    ids = torch.randint(vocab, (2, 7), generator=torch.Generator().manual_seed(0)).to(device)
    valid = torch.ones(2, 7, dtype=torch.bool, device=device)
    valid[1, :2] = False  # a left-padded shorter prompt
    positions = (valid.long().cumsum(-1) - 1).clamp(min=0)
    step = torch.randint(vocab, (2, 3), generator=torch.Generator().manual_seed(1)).to(device)
    step_valid = torch.cat([valid, torch.tensor([[1, 1, 1], [1, 0, 0]], dtype=torch.bool, device=device)], 1)
    step_pos = valid.sum(-1, keepdim=True) + torch.arange(3, device=device)
    ours, theirs = DynamicCache(config=model.config), DynamicCache(config=model.config)
    cache_kwarg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    got = [fast(ids, valid, positions, ours), fast(step, step_valid, step_pos, ours)]
    want = []
    for x, v, p in ((ids, valid, positions), (step, step_valid, step_pos)):
        mask = attention_mask(v, x.shape[1], fast.dtype)
        out = model(input_ids=x, attention_mask=mask, position_ids=p, use_cache=True, **{cache_kwarg: theirs})
        want.append(out.logits.float())
    checks = [(got[0], want[0], valid), (got[1], want[1], step_valid[:, -3:])]
    for g, w, real in checks:
        g, w = g[real], w[real]
        scale = w.abs().max().clamp(min=1.0)
        err = float((g - w).abs().max() / scale)
        top2 = w.topk(2, dim=-1).values
        clear = (top2[:, 0] - top2[:, 1]) > tolerance * scale
        if err > tolerance or not torch.equal(g.argmax(-1)[clear], w.argmax(-1)[clear]):
            return f"logits differ from the model's forward (max relative error {err:.2e})"
    return None


def build_fast_forward(model: PreTrainedModel, precision: str = "fp32") -> FastForward | None:
    """The fast forward for `model` with products in `precision`, or None (with the reason logged) where it does
    not apply or does not match the model's own forward; a precision this machine cannot run is a ValueError."""
    reason = unsupported_reason(model)
    if reason is None:
        fast = FastForward(model, precision=precision)
        reason = check_against_model(fast, model)
        if reason is None:
            products = {"kernel": "the CPU decoding kernel", "packed": "oneDNN", "dense": "F.linear"}
            logger.info(
                "fast forward on: fused %s products on %s, in-place key/value buffers", precision, products[fast.mode]
            )
            return fast
    logger.info("fast forward not used (%s); decoding runs the model's own forward", reason)
    return None
