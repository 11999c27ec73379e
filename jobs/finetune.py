"""Ray job: TASC-ft fine-tuning on Ray Train, the same arguments as `tasc-ray finetune` (prints the JSON summary).

    ray job submit --working-dir . -- python jobs/finetune.py --model DIR --train data.parquet --out DIR \
        --num-workers 4 --use-gpu

Connects to the cluster in RAY_ADDRESS (set by `ray job submit`), else starts a local Ray.
"""

import sys

from tasc_ray.cli.main import main as cli_main


def main(argv: list[str] | None = None) -> int:
    return cli_main(["finetune", "--json", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
