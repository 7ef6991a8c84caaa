"""The `aggregator` command's option types: values checked, and refused in our own words.

Each type's `convert` returns the value the command uses or fails with a message
that names what was expected and what was given, e.g. `expected a whole number
>= 0, got 'ten'`. `moment` also turns relative times (`10m`, `2h`, `3d`) into
the ISO 8601 timestamps the API takes.
"""

from __future__ import annotations

import re
from datetime import UTC
from datetime import datetime
from datetime import timedelta
from typing import Any

import click
import orjson

# Relative times: a whole number and a unit, counted back from now.
UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
RELATIVE = re.compile(r"^(\d+)([smhdw])$")


def _bounds(minimum: float | None, maximum: float | None, open_max: bool) -> str:
    if minimum is not None and maximum is not None:
        return f" in [{minimum:g}, {maximum:g}{')' if open_max else ']'}"
    if minimum is not None:
        return f" >= {minimum:g}"
    return ""


class Whole(click.ParamType):
    """A whole number within bounds."""

    name = "integer"

    def __init__(self, minimum: int | None = None, maximum: int | None = None) -> None:
        self.minimum = minimum
        self.maximum = maximum
        self.expected = f"a whole number{_bounds(minimum, maximum, False)}"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            number = value
        else:
            try:
                number = int(str(value).strip())
            except ValueError:
                self.fail(f"expected {self.expected}, got {value!r}", param, ctx)
        too_low = self.minimum is not None and number < self.minimum
        if too_low or (self.maximum is not None and number > self.maximum):
            self.fail(f"expected {self.expected}, got {value!r}", param, ctx)
        return number


class Number(click.ParamType):
    """A decimal number within bounds; `above` excludes the minimum, `below` the maximum."""

    name = "number"

    def __init__(
        self,
        minimum: float | None = None,
        maximum: float | None = None,
        *,
        above: bool = False,
        below: bool = False,
        unit: str = "",
    ) -> None:
        self.minimum = minimum
        self.maximum = maximum
        self.above = above
        self.below = below
        if above and maximum is None:
            bounds = f" > {minimum:g}"
        else:
            bounds = _bounds(minimum, maximum, below)
        self.expected = f"a number{f' of {unit}' if unit else ''}{bounds}"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> float:
        if isinstance(value, float):
            number = value
        else:
            try:
                number = float(str(value).strip())
            except ValueError:
                number = float("nan")
        if not self._within(number):  # NaN is never within
            self.fail(f"expected {self.expected}, got {value!r}", param, ctx)
        return number

    def _within(self, number: float) -> bool:
        if self.minimum is not None:
            if number < self.minimum or (self.above and number == self.minimum):
                return False
        if self.maximum is not None:
            if number > self.maximum or (self.below and number == self.maximum):
                return False
        return number == number


class JsonObject(click.ParamType):
    """A JSON object, kept as the text given (the API parses it again)."""

    name = "json"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        try:
            parsed = orjson.loads(value)
        except orjson.JSONDecodeError as exc:
            self.fail(
                f'expected a JSON object such as \'{{"level": "error"}}\', not JSON: {exc}',
                param,
                ctx,
            )
        if not isinstance(parsed, dict):
            self.fail(f"expected a JSON object, got {type(parsed).__name__}: {value!r}", param, ctx)
        return str(value)


def parse_moment(text: str, now: datetime | None = None) -> datetime:
    """Return the time `text` names: `10m`, `2h`, `3d`, `1w` ago, or an ISO 8601 timestamp.

    A timestamp without a UTC offset is in the local time zone, as `docker logs
    --since` and `journalctl --since` read it. ValueError says what was expected.
    """
    text = text.strip()
    relative = RELATIVE.match(text)
    if relative:
        amount, unit = int(relative.group(1)), relative.group(2)
        try:
            return (now or datetime.now(UTC)) - timedelta(seconds=amount * UNITS[unit])
        except OverflowError:
            raise ValueError(f"{text!r} reaches back before the year 1") from None
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(
            "expected a time like 10m, 2h, 3d (ago) or an ISO 8601 timestamp such as"
            f" 2026-12-02T10:00:00Z, got {text!r}"
        ) from None
    return moment if moment.tzinfo is not None else moment.astimezone()


class Moment(click.ParamType):
    """A point in time for --since/--until, sent to the API as ISO 8601 with an offset."""

    name = "time"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        try:
            return parse_moment(str(value)).isoformat()
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


class OneOf(click.Choice):
    """One of a few words, refused in the same words as the other options."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if value in self.choices:
            return value
        words = " or ".join(str(choice) for choice in self.choices)
        self.fail(f"expected {words}, got {value!r}", param, ctx)
