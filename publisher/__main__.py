"""Entry point for `python -m publisher`."""

from publisher.cli import main

raise SystemExit(main())
