"""The CPU kernels for decoding (kernels/gemm.c: the matrix products; kernels/attention.c: attention, RMS norm and
SiLU, batch-invariant): built once per machine into one library, loaded with ctypes.

The C sources ship with the package. The first process that needs them compiles them with the system C compiler
(`$CC`, else `cc`; -O3 -march=native -fopenmp, about a second) into the cache directory, keyed by the source,
the compiler and the CPU, so later starts only load it. The library links the same OpenMP runtime as torch
(libgomp.so.1, already loaded by torch), so its threads are torch's threads. Where there is no compiler, the
build fails, or the loaded kernels disagree with torch on check inputs, `load_kernels()` returns None, the
reason is logged once, and callers keep torch's own operators.

Weights are packed once (`CpuKernels.pack`) into the kernel's panel layout: a copy of the weight, like oneDNN's packed
weights; the model's own parameters are left as they are.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

SOURCES = [Path(__file__).with_name("kernels") / name for name in ("gemm.c", "attention.c")]
PANEL = 16  # output rows per panel (one AVX-512 register of float32)
FLAGS = ["-O3", "-fopenmp", "-shared", "-fPIC"]
# What the kernels are compiled for: this CPU's whole instruction set (default), or a lower x86 level, forced with
# TASC_RAY_CPU_ISA (or build_kernels(isa=...)) to run and test the code paths other CPUs take: the same C source, its
# 64-byte vectors lowered to AVX-512, two AVX2 registers, or four SSE2 ones (no FMA, no bf16).
# `avx512`: native without AMX, the AVX512-BF16 products of CPUs without tiles (offered where this CPU has both).
ISAS = {
    "native": ["-march=native"],
    "avx512": ["-march=native", "-mno-amx-tile", "-mno-amx-bf16", "-mno-amx-int8"],
    "avx2": ["-march=x86-64-v3"],
    "sse2": ["-march=x86-64"],
}


# What the products may run in: float32; bfloat16 weights and inputs; int8 weights (one scale per output) with
# bfloat16 inputs; int8 weights and int8 inputs (one scale per input row), integer sums.
PRECISIONS = ("fp32", "bf16", "int8", "w8a8")


@dataclass
class PanelWeight:
    """A [N, K] weight (and its bias) packed as panels[ceil(N / 16)][K][16] (float32) or panels[ceil(N / 16)]
    [ceil(K / 2)][16][2] (bf16 or int8 pairs along k; on AMX, k pairs padded to whole tiles of 16) or panels
    [ceil(N / 16)][ceil(K / 4)][16][4] (w8a8: int8 quads along k), zero-padded to whole panels; int8 weights have
    one float32 scale per output (`scales`), w8a8 ones also each output's sum of int8 weights (`sums`)."""

    panels: torch.Tensor
    bias: torch.Tensor | None
    out_features: int
    in_features: int
    precision: str = "fp32"
    scales: torch.Tensor | None = None
    sums: torch.Tensor | None = None


class CpuKernels:
    """The built kernels, on float32 CPU tensors and torch's thread count. Calling it is the product
    y[M, N] = x[M, K] @ W^T + b with W packed by `pack` (with bf16 or int8 weights, where the CPU has AVX512-BF16,
    x is rounded to bf16 too and the sums stay float32); `attention`, `rms_norm` and `silu_mul` are the decoder's
    other steps. Every result row depends only on its own inputs, never on the other rows of the call."""

    def __init__(self, library: ctypes.CDLL) -> None:
        args: list[type] = [ctypes.c_void_p] * 4 + [ctypes.c_long] * 3 + [ctypes.c_int]
        self._fns = {"fp32": library.tasc_gemm_f32}
        self.amx = bool(library.tasc_gemm_has_bf16() and library.tasc_gemm_has_amx())
        if library.tasc_gemm_has_bf16():  # on AMX tiles where the CPU has them (and the OS grants them)
            self._fns["bf16"] = library.tasc_gemm_bf16_amx if self.amx else library.tasc_gemm_bf16
        for fn in self._fns.values():
            fn.argtypes, fn.restype = args, None
        if "bf16" in self._fns:  # int8 weights dequantised to the bf16 product
            self._fns["int8"] = library.tasc_gemm_int8
            self._fns["int8"].argtypes, self._fns["int8"].restype = [ctypes.c_void_p] * 5 + args[4:], None
        if library.tasc_gemm_has_w8a8():  # int8 x int8 on AVX512-VNNI
            self._fns["w8a8"] = library.tasc_gemm_w8a8
            self._fns["w8a8"].argtypes, self._fns["w8a8"].restype = [ctypes.c_void_p] * 6 + args[4:], None
        self._attention = library.tasc_attention_f32
        self._attention.argtypes = [ctypes.c_void_p] * 7 + [ctypes.c_long] * 10 + [ctypes.c_float, ctypes.c_int]
        self._rms_norm = library.tasc_rms_norm_f32
        self._rms_norm.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_long] * 2 + [ctypes.c_float, ctypes.c_int]
        self._silu_mul = library.tasc_silu_mul_f32
        self._silu_mul.argtypes = [ctypes.c_void_p] * 2 + [ctypes.c_long] * 2 + [ctypes.c_int]
        for fn in (self._attention, self._rms_norm, self._silu_mul):
            fn.restype = None

    @property
    def precisions(self) -> tuple[str, ...]:
        """The precisions this build runs on this CPU."""
        return tuple(self._fns)

    def pack(self, weight: torch.Tensor, bias: torch.Tensor | None = None, precision: str = "fp32") -> PanelWeight:
        if precision not in self._fns:
            raise ValueError(f"precision {precision!r} is not supported here; supported: {', '.join(self._fns)}")
        n, k = weight.shape
        padded = -n % PANEL
        w = torch.cat([weight, weight.new_zeros(padded, k)]) if padded else weight
        w = w.detach().float()
        scales = sums = None
        if precision == "w8a8":  # int8 quads along k, one scale per output
            quads_k = -(-k // 4)
            w = torch.cat([w, w.new_zeros(w.shape[0], 4 * quads_k - k)], 1) if 4 * quads_k > k else w
            scales, w = _int8_per_output(w)
            sums = w.sum(1, dtype=torch.int32).contiguous()
            panels = w.reshape(-1, PANEL, quads_k, 4).permute(0, 2, 1, 3).contiguous()
        elif precision in ("bf16", "int8"):
            pairs_k = (k + 1) // 2 if not self.amx else -(-((k + 1) // 2) // 16) * 16  # AMX: whole tiles of k
            w = torch.cat([w, w.new_zeros(w.shape[0], 2 * pairs_k - k)], 1) if 2 * pairs_k > k else w
            if precision == "int8":
                scales, w = _int8_per_output(w)
            else:
                w = w.to(torch.bfloat16)
            panels = w.reshape(-1, PANEL, pairs_k, 2).permute(0, 2, 1, 3).contiguous()
        else:
            panels = w.reshape(-1, PANEL, k).transpose(1, 2).contiguous()
        b = None if bias is None else torch.cat([bias.detach().float(), bias.new_zeros(padded)]).contiguous()
        return PanelWeight(panels, b, n, k, precision, scales, sums)

    def __call__(self, x: torch.Tensor, weight: PanelWeight) -> torch.Tensor:
        x = x.contiguous()
        m, k = x.shape
        if k != weight.in_features:
            raise ValueError(f"gemm: x {tuple(x.shape)} does not fit a [{weight.out_features}, {k}] weight")
        y = torch.empty(m, weight.out_features, dtype=torch.float32)
        bias = weight.bias.data_ptr() if weight.bias is not None else None
        n, threads = weight.out_features, torch.get_num_threads()
        if weight.sums is not None:
            assert weight.scales is not None
            w, sums, scales = weight.panels.data_ptr(), weight.sums.data_ptr(), weight.scales.data_ptr()
            self._fns["w8a8"](x.data_ptr(), w, sums, scales, bias, y.data_ptr(), m, n, k, threads)
        elif weight.scales is not None:
            scales = weight.scales.data_ptr()
            self._fns["int8"](x.data_ptr(), weight.panels.data_ptr(), scales, bias, y.data_ptr(), m, n, k, threads)
        else:
            self._fns[weight.precision](x.data_ptr(), weight.panels.data_ptr(), bias, y.data_ptr(), m, n, k, threads)
        return y

    @staticmethod
    def dequantised(weight: PanelWeight) -> torch.Tensor:
        """The [N, K] float32 weight an int8 or w8a8 PanelWeight stands for (scale * int8), as the product uses it."""
        assert weight.scales is not None
        panels = weight.panels
        rows = panels.permute(0, 2, 1, 3).reshape(-1, panels.shape[1] * panels.shape[3]).float()
        return (rows * weight.scales[:, None])[: weight.out_features, : weight.in_features]

    def attention(
        self,
        q: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        allowed: torch.Tensor,
        scale: float,
        prefix: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """[B, Q, H, D] = softmax(scale q k^T) v per query over the cache slots `allowed` [B, Q, P + S] lets it see, for
        q [B, Q, H, D] and keys/values [B, KV, S, D] (views of a larger buffer are fine; KV divides H). `prefix`:
        keys and values [1, KV, P, D] of a prompt prefix every row shares, stored once, its slots before each row's
        own (the first P columns of `allowed`); the result is the same as with the prefix copied into every row."""
        b, nq, h, d = q.shape
        kv, s = keys.shape[1], keys.shape[2]
        pk, pv = prefix if prefix is not None else (keys[:1, :, :0], values[:1, :, :0])
        p = pk.shape[2]
        shapes_ok = keys.stride() == values.stride() and keys.stride()[2:] == (d, 1) and allowed.shape[-1] == p + s
        if d % 16 or d > 256 or h % kv or not shapes_ok or pk.stride() != pv.stride() or pk.stride()[2:] != (d, 1):
            raise ValueError(f"attention: unsupported shapes q {tuple(q.shape)}, keys {tuple(keys.shape)}")
        q, allowed = q.contiguous(), allowed.to(torch.uint8).contiguous()
        out = torch.empty_like(q)
        self._attention(
            q.data_ptr(), keys.data_ptr(), values.data_ptr(), pk.data_ptr(), pv.data_ptr(), allowed.data_ptr(),
            out.data_ptr(), b, nq, h, kv, p, s, d, keys.stride(0), keys.stride(1), pk.stride(1), scale,
            torch.get_num_threads(),
        )  # fmt: skip
        return out

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """x / sqrt(mean(x^2) + eps) * weight over the last axis of a [T, N] tensor (N a multiple of 16)."""
        x = x.contiguous()
        y = torch.empty_like(x)
        self._rms_norm(
            x.data_ptr(), weight.data_ptr(), y.data_ptr(), x.shape[0], x.shape[1], eps, torch.get_num_threads()
        )
        return y

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """silu(gate) * up for [T, 2N] rows laid out [gate | up] (N a multiple of 16): [T, N]."""
        gate_up = gate_up.contiguous()
        t, n = gate_up.shape[0], gate_up.shape[1] // 2
        y = gate_up.new_empty(t, n)
        self._silu_mul(gate_up.data_ptr(), y.data_ptr(), t, n, torch.get_num_threads())
        return y

    @staticmethod
    def supports_model(hidden: int, intermediate: int, head_dim: int) -> bool:
        """Whether attention, RMS norm and SiLU here fit a model of these sizes (multiples of 16, head_dim <= 256)."""
        return hidden % 16 == 0 and intermediate % 16 == 0 and head_dim % 16 == 0 and head_dim <= 256


def _int8_per_output(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 with one scale per output row (its largest weight maps to +-127): (scales, int8 weights)."""
    largest = w.abs().amax(1)
    scales = torch.where(largest > 0, largest / 127, torch.ones_like(largest)).contiguous()
    return scales, (w / scales[:, None]).round().clamp(-127, 127).to(torch.int8)


def quantised_rows(x: torch.Tensor) -> torch.Tensor:
    """x [M, K] as the w8a8 product sees it: each row rounded to int8 steps of its own scale (largest |x| -> 127)."""
    largest = x.abs().amax(1, keepdim=True)
    inv = torch.where(largest > 0, 127.0 / largest, torch.ones_like(largest))
    scale = torch.where(largest > 0, largest / 127.0, torch.ones_like(largest))
    return (x * inv).round().clamp(-127, 127) * scale


def _cache_dir() -> Path:
    from tasc_ray.models import cache_root  # models imports the engine's config; imported here to stay light

    return cache_root() / "kernels"


def _cpu_key() -> str:
    """What -march=native depends on: the CPU's model and instruction-set flags."""
    try:
        info = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        info = []
    wanted = [line for line in info if line.startswith(("model name", "flags"))][:2]
    return "\n".join(wanted) or platform.processor()


def _build(compiler: str, isa: str = "native") -> Path:
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True).stdout
    sources = [source.read_text() for source in SOURCES]
    flags = [*FLAGS, *ISAS[isa]]
    key = hashlib.sha256("\0".join([*sources, version, " ".join(flags), _cpu_key()]).encode()).hexdigest()
    target = _cache_dir() / f"libtasc_gemm-{key[:16]}.so"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = Path(tmp) / target.name
        result = subprocess.run(
            [compiler, *flags, *map(str, SOURCES), "-o", str(built)], capture_output=True, text=True
        )
        if result.returncode != 0:
            raise RuntimeError(f"{compiler} failed: {result.stderr.strip()[-400:]}")
        os.replace(built, target)  # atomic: a concurrent builder's identical file is as good
    logger.info("built the CPU decoding kernels (%s): %s", isa, target)
    return target


def _agrees_with_torch(kernels: CpuKernels) -> bool:
    """Check every kernel against torch: products in float32 as they are, bf16 against torch on the bf16-rounded
    operands; attention against SDPA with a ragged mask; RMS norm; SiLU."""
    random = torch.Generator().manual_seed(0)
    for m, n, k in ((1, 37, 35), (3, 200, 64), (6, 130, 96), (27, 8, 16)):
        x, w, b = torch.randn(m, k, generator=random), torch.randn(n, k, generator=random), torch.randn(n)
        for precision in kernels.precisions:
            packed = kernels.pack(w, b, precision)
            xr, wr = (x, w) if precision == "fp32" else (x.bfloat16().float(), w.bfloat16().float())
            if precision in ("int8", "w8a8"):
                wr = kernels.dequantised(packed)
            if precision == "w8a8":
                xr = quantised_rows(x)
            if not torch.allclose(kernels(x, packed), xr @ wr.T + b, atol=1e-4, rtol=1e-4):
                return False
    q, kv = torch.randn(2, 3, 4, 32, generator=random), torch.randn(2, 2, 2, 9, 32, generator=random)
    allowed = torch.rand(2, 3, 9, generator=random) > 0.3
    allowed[:, :, 0] = True
    want = F.scaled_dot_product_attention(
        q.transpose(1, 2), kv[0].repeat_interleave(2, 1), kv[1].repeat_interleave(2, 1), allowed[:, None], scale=0.3
    ).transpose(1, 2)
    x, weight = torch.randn(5, 48, generator=random), torch.randn(48, generator=random)
    gate_up = torch.randn(5, 64, generator=random) * 4
    checks = [
        (kernels.attention(q, kv[0], kv[1], allowed, 0.3), want),
        (kernels.rms_norm(x, weight, 1e-5), F.rms_norm(x, (48,), weight, 1e-5)),
        (kernels.silu_mul(gate_up), F.silu(gate_up[:, :32]) * gate_up[:, 32:]),
    ]
    return all(torch.allclose(got, expected, atol=1e-5, rtol=1e-4) for got, expected in checks)


@cache
def load_kernels() -> CpuKernels | None:
    """The built and checked kernels, or None (the reason logged) where they cannot be had; once per process."""
    return build_kernels()


def available_isas() -> list[str]:
    """The instruction-set levels the kernels can be built for and run on here (`native` first)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return ["native"]
    flags = _cpu_key() + " "
    no_amx = ["avx512"] if " amx_tile " in flags and " avx512_bf16 " in flags else []
    return ["native", *no_amx, *(["avx2"] if " avx2 " in flags and " fma " in flags else []), "sse2"]


def build_kernels(isa: str | None = None) -> CpuKernels | None:
    """Build (or find in the cache), load and check the kernels for `isa` (default: TASC_RAY_CPU_ISA, else
    native); None, with the reason logged, where that fails. An ISA this machine cannot run is a ValueError."""
    if os.environ.get("TASC_RAY_NO_CPU_KERNEL"):
        logger.info("CPU decoding kernels off (TASC_RAY_NO_CPU_KERNEL is set)")
        return None
    isa = isa or os.environ.get("TASC_RAY_CPU_ISA") or "native"
    if isa not in available_isas():
        raise ValueError(f"CPU kernel ISA {isa!r} cannot run here; available: {', '.join(available_isas())}")
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        logger.info("CPU decoding kernels not used: no C compiler (cc/gcc) on PATH")
        return None
    try:
        kernels = CpuKernels(ctypes.CDLL(str(_build(compiler, isa))))
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        logger.warning("CPU decoding kernels not used: %s", exc)
        return None
    if not _agrees_with_torch(kernels):
        logger.warning("CPU decoding kernels not used: they disagree with torch on this machine")
        return None
    return kernels
