"""Ray Serve entry points from the checkout (`serve run serve_apps.openai_app:build_app ...`); the code is in
tasc_ray.serving."""
