"""Entry point for `python -m publisher`, the same command as `aggregator`."""

from publisher.cli import main

raise SystemExit(main())
