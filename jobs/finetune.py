"""Ray job entry point for TASC-ft fine-tuning (thin: parse the `finetune` arguments, call the library).

    ray job submit --working-dir . -- python jobs/finetune.py --model DIR --train data.parquet --out DIR ...

Connects to the cluster in RAY_ADDRESS (set by `ray job submit`), else starts a local Ray. Prints the JSON summary.
"""

from __future__ import annotations

import sys
from pathlib import Path

try:
    import tasc_ray  # noqa: F401
except ImportError:  # run from a working directory where the package is not installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tasc_ray.cli import main  # noqa: E402

if __name__ == "__main__":
    argv = sys.argv[1:]
    sys.exit(main(["finetune", *argv, *([] if "--json" in argv else ["--json"])]))
