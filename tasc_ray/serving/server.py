"""Old import path, kept only for callers not yet moved (tests/test_infra.py, benchmarks/serve.py): import
ServeConfig from tasc_ray.serving.config, build_app from tasc_ray.serving.app. Delete this file once they do."""

from tasc_ray.serving.config import ServeConfig

__all__ = ["ServeConfig"]
