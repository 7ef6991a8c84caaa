"""Entry point for `python -m aggregator_client`, the same command as `aggregator`."""

from aggregator_client.cli import main

raise SystemExit(main())
