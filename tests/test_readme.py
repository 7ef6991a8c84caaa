"""The README's quickstarts, executed line by line against a live stack (a doc test).

Each `sh` block of a quickstart section is run in one bash, as a reader would
type it, against a token-guarded API and a worker. After each command the
output is compared with the lines the README shows under it. Values that differ
on every run (ids, times, rates, cursors) are compared by shape; counts, fields,
statuses and messages must match exactly.
"""

from __future__ import annotations

import os
import re
import secrets
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from dataclasses import field
from pathlib import Path
from typing import Any

import orjson
import pytest

from scripts.stack import BIN
from scripts.stack import ROOT
from scripts.stack import Api
from scripts.stack import Worker

README = ROOT / "README.md"
QUICKSTARTS = ("## Five minutes with curl", "## Your own events: the `aggregator` command")
DOCUMENTED_URL = "http://127.0.0.1:8080"
TOKEN = "readme-" + secrets.token_hex(20)
# JSON fields whose values change on every run: compared by type only.
VOLATILE_FIELDS = frozenset(
    {
        "batch_id",
        "idempotency_key",
        "stored_at",
        "oldest_stored_at",
        # Positions continue from what earlier tests stored in the same database.
        "oldest_position",
        "uptime_seconds",
        "next_cursor",
        "request_id",
    }
)
# Commands that run until Ctrl-C: the test sends it after this many seconds.
FOLLOW_SECONDS = 3


@dataclass
class Step:
    """One command of a quickstart and the output the README shows for it."""

    command: str
    expected: list[str] = field(default_factory=list)


def sh_block(section: str) -> str:
    """Return the first ```sh block after the section heading."""
    text = README.read_text()
    start = text.index(section + "\n")
    block = re.search(r"```sh\n(.*?)```", text[start:], re.S)
    assert block, f"no sh block in {section}"
    return block.group(1)


def parse_steps(block: str) -> list[Step]:
    """Split a block into commands (with their here-documents) and the lines shown after them."""
    steps: list[Step] = []
    lines = iter(block.splitlines())
    for line in lines:
        if not line.strip() or line.startswith("#"):
            continue
        heredoc = re.search(r"<<'?(\w+)'?", line)
        if steps and not _is_command(line):
            steps[-1].expected.append(line)
            continue
        command = [line]
        if heredoc:
            command.extend(_until(lines, heredoc.group(1)))
        steps.append(Step("\n".join(command)))
    return steps


def _is_command(line: str) -> bool:
    return bool(re.match(r"(curl|aggregator|export|cat|printf) |H=|\. ", line))


def _until(lines: Iterator[str], marker: str) -> Iterator[str]:
    for line in lines:
        yield line
        if line == marker:
            return


def normalise_text(line: str) -> str:
    """Mask what changes run to run in a text line: decimals, hex ids, run prefixes."""
    line = re.sub(r"\b[0-9a-f]{32}\b", "<id>", line)
    line = re.sub(r"\brun-[0-9a-f]{8}\b", "run-<hex>", line)
    return re.sub(r"\d+\.\d+", "<n>", line)


def masked(value: Any) -> Any:
    """Replace the values of volatile fields by their type, everywhere in a JSON value."""
    if isinstance(value, dict):
        return {
            key: type(item).__name__ if key in VOLATILE_FIELDS else masked(item)
            for key, item in value.items()
        }
    if isinstance(value, list):
        return [masked(item) for item in value]
    return value


def same_output(expected: list[str], actual: list[str]) -> bool:
    if len(expected) != len(actual):
        return False
    for want, got in zip(expected, actual, strict=True):
        try:
            documented, observed = orjson.loads(want), orjson.loads(got)
        except orjson.JSONDecodeError:
            if normalise_text(want) != normalise_text(got):
                return False
        else:
            if masked(documented) != masked(observed):
                return False
    return True


def run_block(block: str, api: Api, workdir: Path) -> list[tuple[Step, list[str]]]:
    """Run a block's commands in one bash, in order, and return each one's output lines."""
    steps = parse_steps(block)
    script = ["set -u"]
    for index, step in enumerate(steps):
        command = step.command.replace(DOCUMENTED_URL, api.url)
        if command.startswith("aggregator tail") and "--no-follow" not in command:
            command = f"timeout -s INT {FOLLOW_SECONDS} {command}"
        # On a line of its own, whether or not the output ended with a newline (curl's doesn't).
        script += [command, f"printf '\\n@@step {index}\\n'"]
    env = {
        **{k: v for k, v in os.environ.items() if k not in ("API_TOKEN", "AGGREGATOR_URL")},
        "TOKEN": TOKEN,
        "PATH": f"{BIN}:{os.environ['PATH']}",
    }
    done = subprocess.run(
        ["bash", "-c", "\n".join(script)],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr
    chunks = re.split(r"\n+@@step \d+\n", done.stdout)
    return [(step, chunk.splitlines()) for step, chunk in zip(steps, chunks, strict=False)]


@pytest.fixture(scope="module")
def guarded(stack_env: dict[str, str], logs: Path) -> Iterator[Api]:
    """An API with one token of every scope, on the documented settings (as the demo runs it)."""
    env = {**stack_env, "AUTH_DISABLED": "", "API_TOKENS": f"{TOKEN}:publish+read+admin"}
    server = Api(env, logs / "readme-api.log", workers=1).start()
    yield server
    server.stop()


def test_the_quickstarts_run_as_written(
    guarded: Api, worker: Worker, clean: None, tmp_path: Path
) -> None:
    # What the demo did first (`--events 100`): 90 distinct events and 10 copies.
    seeded = subprocess.run(
        [str(BIN / "aggregator"), "publish", "--generate", "100", "--verify", "--url", guarded.url],
        env={**os.environ, "API_TOKEN": TOKEN},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert seeded.returncode == 0, seeded.stdout + seeded.stderr
    mismatches = []
    for section in QUICKSTARTS:
        for step, output in run_block(sh_block(section), guarded, tmp_path):
            if not same_output(step.expected, output):
                mismatches.append(
                    f"{section}\n$ {step.command}\nREADME:\n"
                    + "\n".join(step.expected)
                    + "\nactual:\n"
                    + "\n".join(output)
                )
    assert not mismatches, "\n\n".join(mismatches)


def test_the_parser_sees_commands_outputs_and_here_documents() -> None:
    block = (
        "# a comment\nexport A=1\ncurl -s x\n{\"a\": 1}\n\ncat > f <<'EOF'\n"
        '{"b": 2}\nEOF\naggregator publish f\nread    3 events\n'
    )
    steps = parse_steps(block)
    assert [step.command.split()[0] for step in steps] == ["export", "curl", "cat", "aggregator"]
    assert steps[1].expected == ['{"a": 1}']
    assert steps[2].command.endswith('{"b": 2}\nEOF') and steps[2].expected == []
    assert steps[3].expected == ["read    3 events"]
