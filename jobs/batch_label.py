"""Ray job: batch labeling on Ray Data, the same arguments as `tasc-ray label` (prints the JSON summary).

    ray job submit --working-dir . -- python jobs/batch_label.py --input s3://bucket/prompts.parquet \
        --output s3://bucket/labels --model smollm2-135m --index s3://bucket/index --prompt-template "{prompt}"

Connects to the cluster in RAY_ADDRESS (set by `ray job submit`), else starts a local Ray. The cluster's image
has the package installed (infra/Dockerfile), as every job here assumes.
"""

import sys

from tasc_ray.cli.main import main as cli_main


def main(argv: list[str] | None = None) -> int:
    return cli_main(["label", "--json", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
