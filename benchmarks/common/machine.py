"""What a benchmark ran on: the machine description stored in every result (CPU, cores, memory, load average,
library versions, GPU) and whether other work shared the CPU (absolute numbers then measure contention too)."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

BUSY_LOAD_PER_CPU = 0.75  # a start load average above this share of the cores means other work shared the CPU


def cpu_was_shared(load_average: float, cpus: int | None) -> bool:
    """Whether a benchmark started on a busy machine (its absolute numbers then measure contention too)."""
    return load_average > BUSY_LOAD_PER_CPU * (cpus or 1)


def shared_cpu_note(machine: dict[str, Any]) -> str:
    """One sentence for a result file: whether the CPU was shared when the run started."""
    if cpu_was_shared(machine["load_average_start"][0], machine["cpus"]):
        return (
            f"**The {machine['cpus']}-core CPU was shared with other work during this run** (load average above): "
            "absolute numbers are noisy and pessimistic; ratios measured side by side in the same run are the "
            "comparable figures."
        )
    return "A quiet machine (nothing else running)."


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def memory_gb() -> float | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        return None


def git_commit() -> str | None:
    """The checkout's commit (None outside a git checkout)."""
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, cwd=Path(__file__).parent
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def describe_machine() -> dict[str, Any]:
    """The machine as a benchmark starts on it; `load_average_end` is added when its report is written."""
    import torch

    cpus = os.cpu_count()
    load = os.getloadavg()
    return {
        "host": platform.node(),
        "platform": platform.platform(),
        "arch": platform.machine(),
        "cpu": cpu_model(),
        "cpus": cpus,
        "memory_gb": memory_gb(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": _version("transformers"),
        "torch_threads": torch.get_num_threads(),
        "load_average_start": load,
        "cpu_was_shared": cpu_was_shared(load[0], cpus),
    }


def machine_line(machine: dict[str, Any]) -> str:
    """The machine description as one markdown paragraph, ending with the shared-CPU note."""
    loads = [f"at start {', '.join(f'{x:.1f}' for x in machine['load_average_start'])}"]
    if machine.get("load_average_end"):
        loads.append(f"at end {', '.join(f'{x:.1f}' for x in machine['load_average_end'])}")
    memory = f", {machine['memory_gb']:.0f} GB" if machine.get("memory_gb") else ""
    gpu = f", GPU {machine['gpu']}" if machine.get("gpu") else ""
    return (
        f"Machine: {machine['cpu']}, {machine['cpus']} cores{memory}{gpu}, {machine['platform']}; "
        f"torch {machine['torch']} ({machine['torch_threads']} threads), transformers {machine['transformers']}; "
        f"load average {' and '.join(loads)}. {shared_cpu_note(machine)}"
    )
