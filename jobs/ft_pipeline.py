"""Ray job: the TASC-ft pipeline, the same arguments as `tasc-ray ft-pipeline` (prints the JSON summary).

    ray job submit --working-dir . -- python jobs/ft_pipeline.py --model smollm2-135m \
        --request-log s3://bucket/e2e/logs/ --work-dir /mnt/runs/e2e --metric slot_f1 --num-workers 4 --use-gpu

Connects to the cluster in RAY_ADDRESS (set by `ray job submit`), else starts a local Ray. A rerun with the same
--work-dir resumes: stages whose output is complete are skipped.
"""

import sys

from tasc_ray.cli.main import main as cli_main


def main(argv: list[str] | None = None) -> int:
    return cli_main(["ft-pipeline", "--json", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
