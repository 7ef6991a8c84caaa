"""Deprecated name of the client library, kept for one release: use `aggregator_client`.

The client moved to its own distribution, `log-aggregator-client` (clients/python/),
importable as `aggregator_client`. Each `publisher.X` module is that package's
`aggregator_client.X`, the same module object, so code written against the old
name keeps working unchanged (monkeypatching included) until it is updated.
"""

import importlib
import sys

_MODULES = (
    "batches",
    "cli",
    "client",
    "event_ids",
    "events",
    "omprog",
    "outcomes",
    "retries",
    "verify",
)

for _name in _MODULES:
    _module = importlib.import_module(f"aggregator_client.{_name}")
    sys.modules[f"{__name__}.{_name}"] = _module
    globals()[_name] = _module
