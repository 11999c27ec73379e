"""ensure_ray: join the cluster in RAY_ADDRESS (a cluster, `ray job submit`), else start a local Ray."""

from __future__ import annotations

import logging
import os

logger = logging.getLogger(__name__)


def ensure_ray(num_cpus: float | None = None) -> bool:
    """Connect to RAY_ADDRESS when set, else start a local Ray sized for this machine. True if started here."""
    import ray

    if ray.is_initialized():
        return False
    env_vars = {"TOKENIZERS_PARALLELISM": "false"}
    if os.environ.get("RAY_ADDRESS"):
        logger.info("connecting to the Ray cluster at %s", os.environ["RAY_ADDRESS"])
        ray.init(runtime_env={"env_vars": env_vars}, log_to_driver=False)
    else:
        cpus = num_cpus or os.cpu_count() or 2
        logger.info("starting a local Ray with %s CPUs", cpus)
        ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": env_vars})
    return True
