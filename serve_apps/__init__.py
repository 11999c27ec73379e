"""Ray Serve application builders for tasc_ray (`serve run serve_apps.openai_app:build_app ...`)."""
