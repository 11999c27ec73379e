"""The CPU kernel for decoding's matrix products (kernels/gemm.c): built once per machine, loaded with ctypes.

The C source ships with the package. The first process that needs it compiles it with the system C compiler
(`$CC`, else `cc`; -O3 -march=native -fopenmp, about a second) into the cache directory, keyed by the source,
the compiler and the CPU, so later starts only load it. The library links the same OpenMP runtime as torch
(libgomp.so.1, already loaded by torch), so its threads are torch's threads. Where there is no compiler, the
build fails, or the loaded kernel disagrees with torch on a check product, `load_gemm()` returns None, the
reason is logged once, and callers keep torch's own products.

Weights are packed once (`Gemm.pack`) into the kernel's panel layout: a copy of the weight, like oneDNN's packed
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

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("kernels") / "gemm.c"
PANEL = 16  # output rows per panel (one AVX-512 register of float32)
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC"]


PRECISIONS = ("fp32", "bf16")  # what the products may run in: float32, or bfloat16 weights and inputs


@dataclass
class PanelWeight:
    """A [N, K] weight (and its bias) packed as panels[ceil(N / 16)][K][16] (float32) or panels[ceil(N / 16)]
    [ceil(K / 2)][16][2] (bf16 pairs along k), zero-padded to whole panels."""

    panels: torch.Tensor
    bias: torch.Tensor | None
    out_features: int
    in_features: int
    precision: str = "fp32"


class Gemm:
    """y[M, N] = x[M, K] @ W^T + b for float32 CPU tensors, W packed by `pack`, on torch's thread count; with
    bf16 weights (where the CPU has AVX512-BF16) x is rounded to bf16 too and the sums stay float32."""

    def __init__(self, library: ctypes.CDLL) -> None:
        args = [ctypes.c_void_p] * 4 + [ctypes.c_long] * 3 + [ctypes.c_int]
        self._fns = {"fp32": library.tasc_gemm_f32}
        if library.tasc_gemm_has_bf16():
            self._fns["bf16"] = library.tasc_gemm_bf16
        for fn in self._fns.values():
            fn.argtypes, fn.restype = args, None

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
        if precision == "bf16":
            w = torch.cat([w, w.new_zeros(w.shape[0], k % 2)], 1) if k % 2 else w
            pairs = w.to(torch.bfloat16).reshape(-1, PANEL, (k + 1) // 2, 2).permute(0, 2, 1, 3)
            panels = pairs.contiguous()
        else:
            panels = w.reshape(-1, PANEL, k).transpose(1, 2).contiguous()
        b = None if bias is None else torch.cat([bias.detach().float(), bias.new_zeros(padded)]).contiguous()
        return PanelWeight(panels, b, n, k, precision)

    def __call__(self, x: torch.Tensor, weight: PanelWeight) -> torch.Tensor:
        x = x.contiguous()
        m, k = x.shape
        if k != weight.in_features:
            raise ValueError(f"gemm: x {tuple(x.shape)} does not fit a [{weight.out_features}, {k}] weight")
        y = torch.empty(m, weight.out_features, dtype=torch.float32)
        bias = weight.bias.data_ptr() if weight.bias is not None else None
        n, threads = weight.out_features, torch.get_num_threads()
        self._fns[weight.precision](x.data_ptr(), weight.panels.data_ptr(), bias, y.data_ptr(), m, n, k, threads)
        return y


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


def _build(compiler: str) -> Path:
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True).stdout
    key = hashlib.sha256("\0".join([SOURCE.read_text(), version, " ".join(FLAGS), _cpu_key()]).encode()).hexdigest()
    target = _cache_dir() / f"libtasc_gemm-{key[:16]}.so"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = Path(tmp) / target.name
        result = subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", str(built)], capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"{compiler} failed: {result.stderr.strip()[-400:]}")
        os.replace(built, target)  # atomic: a concurrent builder's identical file is as good
    logger.info("built the CPU decoding kernel: %s", target)
    return target


def _agrees_with_torch(gemm: Gemm) -> bool:
    """Check products against torch's: float32 as they are, bf16 against torch on the bf16-rounded operands."""
    random = torch.Generator().manual_seed(0)
    for m, n, k in ((1, 37, 35), (3, 200, 64), (6, 130, 96), (27, 8, 16)):
        x, w, b = torch.randn(m, k, generator=random), torch.randn(n, k, generator=random), torch.randn(n)
        for precision in gemm.precisions:
            xr, wr = (x, w) if precision == "fp32" else (x.bfloat16().float(), w.bfloat16().float())
            if not torch.allclose(gemm(x, gemm.pack(w, b, precision)), xr @ wr.T + b, atol=1e-4, rtol=1e-4):
                return False
    return True


@cache
def load_gemm() -> Gemm | None:
    """The built and checked kernel, or None (the reason logged) where it cannot be had; once per process."""
    return build_gemm()


def build_gemm() -> Gemm | None:
    """Build (or find in the cache), load and check the kernel; None, with the reason logged, where it fails."""
    if os.environ.get("TASC_RAY_NO_CPU_KERNEL"):
        logger.info("CPU decoding kernel off (TASC_RAY_NO_CPU_KERNEL is set)")
        return None
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        logger.info("CPU decoding kernel not used: no C compiler (cc/gcc) on PATH")
        return None
    try:
        gemm = Gemm(ctypes.CDLL(str(_build(compiler))))
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        logger.warning("CPU decoding kernel not used: %s", exc)
        return None
    if not _agrees_with_torch(gemm):
        logger.warning("CPU decoding kernel not used: its products disagree with torch's on this machine")
        return None
    return gemm
