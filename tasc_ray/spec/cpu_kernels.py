"""The CPU kernel for decoding's few-row products (kernels/gemv.c): built once per machine, loaded with ctypes.

The C source ships with the package. The first process that needs it compiles it with the system C compiler
(`$CC`, else `cc`; -O3 -march=native -fopenmp, about a second) into the cache directory, keyed by the source,
the compiler and the CPU, so later starts only load it. The library links the same OpenMP runtime as torch
(libgomp.so.1, already loaded by torch), so its threads are torch's threads. Where there is no compiler, the
build fails, or the loaded kernel disagrees with torch on a check product, `load_gemv()` returns None, the
reason is logged once, and callers keep torch's own products.
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
from functools import cache
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("kernels") / "gemv.c"
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC"]


class Gemv:
    """y[M, N] = x[M, K] @ w[N, K]^T + bias for contiguous float32 CPU tensors, on torch's thread count."""

    def __init__(self, library: ctypes.CDLL) -> None:
        self._fn = library.tasc_gemv_f32
        self._fn.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_long] * 3 + [ctypes.c_int]
        self._fn.restype = None

    def __call__(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        x = x.contiguous()
        m, k = x.shape
        n = weight.shape[0]
        if weight.shape[1] != k or not weight.is_contiguous():
            raise ValueError(f"gemv: weight {tuple(weight.shape)} (contiguous) does not fit x {tuple(x.shape)}")
        y = torch.empty(m, n, dtype=torch.float32)
        bias_ptr = bias.data_ptr() if bias is not None else None
        self._fn(x.data_ptr(), weight.data_ptr(), bias_ptr, y.data_ptr(), m, n, k, torch.get_num_threads())
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
    target = _cache_dir() / f"libtasc_gemv-{key[:16]}.so"
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


def _agrees_with_torch(gemv: Gemv) -> bool:
    random = torch.Generator().manual_seed(0)
    for m, n, k in ((1, 37, 35), (6, 130, 96), (9, 8, 16)):
        x, w, b = torch.randn(m, k, generator=random), torch.randn(n, k, generator=random), torch.randn(n)
        if not torch.allclose(gemv(x, w, b), x @ w.T + b, atol=1e-4, rtol=1e-4):
            return False
    return True


@cache
def load_gemv() -> Gemv | None:
    """The built and checked kernel, or None (the reason logged) where it cannot be had; once per process."""
    return build_gemv()


def build_gemv() -> Gemv | None:
    """Build (or find in the cache), load and check the kernel; None, with the reason logged, where it fails."""
    if os.environ.get("TASC_RAY_NO_CPU_KERNEL"):
        logger.info("CPU decoding kernel off (TASC_RAY_NO_CPU_KERNEL is set)")
        return None
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        logger.info("CPU decoding kernel not used: no C compiler (cc/gcc) on PATH")
        return None
    try:
        gemv = Gemv(ctypes.CDLL(str(_build(compiler))))
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        logger.warning("CPU decoding kernel not used: %s", exc)
        return None
    if not _agrees_with_torch(gemv):
        logger.warning("CPU decoding kernel not used: its products disagree with torch's on this machine")
        return None
    return gemv
