"""Event ids the API derives, for the topics in DERIVE_EVENT_ID_TOPICS, from events sent without.

The id is aggregator_client.event_ids.derive_event_id of the event exactly as parsed
from the body, before the schema normalises anything (timestamps to UTC), so a
line sent again gets the same id and is stored once.
"""

from __future__ import annotations

from typing import Any

from aggregator_client.event_ids import derive_event_id


class DerivedIds:
    """Which topics get derived ids, and the step that gives them to events lacking one."""

    def __init__(self, patterns: tuple[str, ...]) -> None:
        self._names = frozenset(p for p in patterns if not p.endswith("*"))
        self._prefixes = tuple(p[:-1] for p in patterns if p.endswith("*"))

    def applies(self, topic: Any) -> bool:
        """Tell whether events of this topic get an id derived when they come without one."""
        return isinstance(topic, str) and (topic in self._names or topic.startswith(self._prefixes))

    def fill(self, parsed: Any) -> None:
        """Give every event of a parsed body (an object or an array) that lacks an id its own."""
        events = [parsed] if isinstance(parsed, dict) else parsed
        if not isinstance(events, list):
            return
        for event in events:
            if (
                isinstance(event, dict)
                and "event_id" not in event
                and self.applies(event.get("topic"))
            ):
                try:
                    event["event_id"] = derive_event_id(event)
                except (ValueError, RecursionError):
                    # Nested deeper than the C encoder goes: the schema refuses its
                    # payload (MAX_PAYLOAD_DEPTH) anyway, naming it.
                    continue


def derived_ids(patterns: tuple[str, ...]) -> DerivedIds | None:
    """Return the derivation for these topic patterns, or None when none are set (the default)."""
    return DerivedIds(patterns) if patterns else None
