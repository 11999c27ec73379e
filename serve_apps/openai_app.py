"""`serve run serve_apps.openai_app:build_app model=smollm2-135m index=/path/to/index` from the repository root.

A thin shell over `tasc_ray.serving.app` (where the application lives, importable from the installed package);
`python -m serve_apps.openai_app --write-config` regenerates serve_apps/config.yaml.
"""

from tasc_ray.serving.app import CONFIG_PATH, build_app, default_config, deploy_config, main, render_config

__all__ = ["CONFIG_PATH", "build_app", "default_config", "deploy_config", "main", "render_config"]

if __name__ == "__main__":
    raise SystemExit(main())
