"""`python -m tasc_ray` runs the `tasc-ray` CLI."""

from tasc_ray.cli import main

raise SystemExit(main())
