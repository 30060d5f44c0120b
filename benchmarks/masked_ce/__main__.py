"""Entry point of ``python -m benchmarks.masked_ce``."""

from .cli import main

raise SystemExit(main())
