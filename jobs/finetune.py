"""Ray job entry point for TASC-ft fine-tuning (thin: parse the `finetune` arguments, call the library).

    ray job submit --working-dir . -- python jobs/finetune.py --model DIR --train data.parquet --out DIR ...

Connects to the cluster in RAY_ADDRESS (set by `ray job submit`), else starts a local Ray.
"""

from __future__ import annotations

import sys

from tasc_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["finetune", *sys.argv[1:]]))
