"""Plain functions that take a Connection (or an Engine, where they need a transaction per
step: the export, run_in_transaction), one module per job; this package names them together.

ledger: the write path (a batch stored exactly once, its ledger row, the counters);
counters: the totals and per-topic counters; reading: pages and streams of the log;
dead_letters: the events the database refused. Callers import from those modules;
the names below serve callers that use several at once (the tests).
"""

from app.cursors import InvalidCursor
from app.cursors import decode_cursor
from app.cursors import encode_cursor
from app.store.counters import Totals
from app.store.counters import _prefix_end
from app.store.counters import read_totals
from app.store.counters import topic_page
from app.store.dead_letters import ReplayRefused
from app.store.dead_letters import list_dead_letters
from app.store.dead_letters import replay_counts
from app.store.dead_letters import replay_dead_letter
from app.store.ledger import COPY_FROM_ROWS
from app.store.ledger import BatchOutcome
from app.store.ledger import processed_batches
from app.store.ledger import read_batch
from app.store.ledger import run_in_transaction
from app.store.ledger import store_batch
from app.store.ledger import store_exactly_once
from app.store.reading import iter_events
from app.store.reading import list_events

__all__ = [
    "COPY_FROM_ROWS",
    "BatchOutcome",
    "InvalidCursor",
    "ReplayRefused",
    "Totals",
    "_prefix_end",
    "decode_cursor",
    "encode_cursor",
    "iter_events",
    "list_dead_letters",
    "list_events",
    "processed_batches",
    "read_batch",
    "read_totals",
    "replay_counts",
    "replay_dead_letter",
    "run_in_transaction",
    "store_batch",
    "store_exactly_once",
    "topic_page",
]
