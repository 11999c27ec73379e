"""`python -m tasc_ray` runs the `tasc-ray` CLI."""

from tasc_ray.cli.main import main

raise SystemExit(main())
