"""bench.partitions, bench.horizon and bench.reads run end to end at a tiny size.

Smoke runs only: they check that each command fills its databases, measures every case
without a failed request, drops what it made and exits 0; the numbers are not asserted.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import psycopg2

from scripts.services import plain_dsn
from scripts.stack import ROOT


def run_bench(module: str, args: list[str], server_url: str, tmp_path: Path) -> dict:
    out = tmp_path / f"{module}.json"
    env = {**os.environ, "DATABASE_URL": server_url}
    env.pop("REDIS_URL", None)
    done = subprocess.run(
        [sys.executable, "-m", f"bench.{module}", *args, "--json", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(out.read_text())


def databases(server_url: str) -> set[str]:
    conn = psycopg2.connect(plain_dsn(server_url))
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT datname FROM pg_database WHERE datname LIKE 'agg_bench_%'")
            return {row[0] for row in cur.fetchall()}
    finally:
        conn.close()


def test_partitions_bench_measures_both_layouts_and_drops_a_day(
    pg_server_url: str, tmp_path: Path
) -> None:
    before = databases(pg_server_url)
    args = ["--rows", "3000", "--days", "4", "--repeat", "1", "--requests", "5"]
    args += ["--warmup", "1", "--batches", "20", "--sizes", "1,50"]
    result = run_bench("partitions", args, pg_server_url, tmp_path)
    assert {f["layout"]: f["rows"] for f in result["fill"].values()} == {
        "days": 3000,
        "single": 3000,
    }
    assert len(result["reads"]) == 8
    assert all(r["errors"] == 0 and r["rows_per_page"] > 0 for r in result["reads"])
    assert {(p["layout"], p["size"]) for p in result["publish"]} == {
        ("days", 1),
        ("days", 50),
        ("single", 1),
        ("single", 50),
    }
    assert [d["rows_dropped"] > 0 for d in result["drops"]] == [True]
    assert databases(pg_server_url) == before


def test_horizon_bench_stores_new_and_duplicate_batches_at_both_horizons(
    pg_server_url: str, tmp_path: Path
) -> None:
    before = databases(pg_server_url)
    args = ["--rows", "2000", "--repeat", "1", "--batches", "20", "--sizes", "1,50"]
    result = run_bench("horizon", args, pg_server_url, tmp_path)
    assert {m: f["keys"] for m, f in result["fill"].items()} == {"1": 2000, "10": 20000}
    kinds = {(r["multiple"], r["kind"], r["size"]) for r in result["results"]}
    assert len(kinds) == 8
    for r in result["results"]:
        events = r["batches"] * r["size"]
        if r["kind"] == "all new":
            assert (r["stored"], r["duplicates"]) == (events, 0)
        else:
            assert (r["stored"], r["duplicates"]) == (0, events)
    assert databases(pg_server_url) == before


def test_reads_bench_fills_partitioned_events_and_reads_every_case(
    pg_server_url: str, tmp_path: Path
) -> None:
    before = databases(pg_server_url)
    args = ["--rows", "3000", "--topics", "20", "--requests", "5", "--warmup", "1"]
    result = run_bench("reads", args + ["--export-rows", "1000"], pg_server_url, tmp_path)
    assert (result["fill"]["rows"], result["fill"]["transactions"]) == (3000, 6)
    assert len(result["cases"]) == 7
    assert all(r["errors"] == 0 for r in result["cases"].values())
    assert all(
        r["median_rows_per_page"] > 0
        for case, r in result["cases"].items()
        if case.startswith("/events")
    )
    assert result["export"]["rows"] == 1000
    assert databases(pg_server_url) == before
