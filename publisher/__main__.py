"""`python -m publisher`, the old name of `aggregator` (and of `python -m aggregator_client`)."""

from aggregator_client.cli import main

raise SystemExit(main())
