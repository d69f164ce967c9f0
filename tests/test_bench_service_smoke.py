"""The pure parts of `bench/service_load.py`, its load client `bench/loadgen.py`, its drain
counts `bench/drain.py` and its tables `bench/tables.py`, checked without starting any server.

The bench itself needs PostgreSQL, Redis, an API process and Celery workers and takes minutes,
so it is run by hand; a wrong percentile, a broken table or a bad default would still quietly
corrupt the figures it prints, so those are tested here in milliseconds.
"""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from bench.drain import DRAIN_HEADERS, DrainResult, drain_row
from bench.loadgen import KeepAliveClient, LoadResult, percentile
from bench.tables import markdown_table

BENCH = Path(__file__).resolve().parent.parent / "bench" / "service_load.py"


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_service_load", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("q", [0, 25, 50, 90, 99, 100])
def test_percentile_matches_numpy(q: float) -> None:
    values = [0.3, 0.001, 0.2, 5.0, 0.04, 0.04, 1.5]
    assert percentile(values, q) == pytest.approx(np.percentile(values, q))


def test_percentile_edges() -> None:
    assert math.isnan(percentile([], 50))
    assert percentile([7.0], 99) == 7.0
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def test_markdown_table_and_row_check() -> None:
    table = markdown_table(("a", "b"), [[1, "x"], [2.5, "y"]])
    assert table.splitlines() == ["| a | b |", "|---|---|", "| 1 | x |", "| 2.5 | y |"]
    with pytest.raises(ValueError):
        markdown_table(("a", "b"), [[1]])


def test_latency_rows_pass_and_fail(bench: ModuleType) -> None:
    fast = LoadResult(50.0, 10.0, 500, 0, (0.002,) * 500, (0.003,) * 500)
    slow = LoadResult(200.0, 10.0, 2000, 0, (0.002,) * 1900 + (0.05,) * 100, (0.05,) * 2000)
    errored = LoadResult(
        50.0, 10.0, 500, 3, (0.002,) * 497, (0.002,) * 497, {"HTTP 503": 2, "TimeoutError": 1}
    )
    rows = bench.latency_rows([fast, slow, errored])
    assert all(len(row) == len(bench.LATENCY_HEADERS) for row in rows)
    assert [row[-1] for row in rows] == ["PASS", "FAIL", "FAIL"]
    assert rows[0][1] == "50.0" and rows[0][4] == "2.0"
    assert rows[2][3] == "3 (HTTP 503: 2, TimeoutError: 1)"  # what failed, not only how many
    assert "| PASS |" in markdown_table(bench.LATENCY_HEADERS, rows)


def test_drain_row_counts_lost_and_rates() -> None:
    result = DrainResult(
        jobs=100,
        workers=2,
        worker_start_seconds=5.0,
        seconds=25.0,
        succeeded=98,
        ended_other=1,
        unfinished=1,
        duplicated=0,
    )
    assert result.lost == 2
    assert result.jobs_per_second == pytest.approx(98 / 25)
    assert result.jobs_per_second_ready == pytest.approx(98 / 20)
    row = drain_row(result)
    assert len(row) == len(DRAIN_HEADERS)
    assert row[-2].startswith("2 (1 failed/cancelled, 1 unfinished)")


def test_parse_args_defaults_and_errors(bench: ModuleType) -> None:
    args = bench.parse_args([])
    assert (args.jobs, args.rates, args.seconds, args.solves, args.layers, args.workers) == (
        1000,
        (50.0, 200.0),
        10.0,
        100,
        100,
        2,
    )
    assert bench.parse_args(["--jobs", "300", "--rates", "25,75"]).rates == (25.0, 75.0)
    for bad in (["--jobs", "0"], ["--rates", "a,b"], ["--rates", "-5"], ["--seconds", "0"]):
        with pytest.raises(SystemExit):
            bench.parse_args(bad)
    with pytest.raises(SystemExit):
        bench.parse_args(["--redis", "redis://10.0.0.5:6379/7"])


def test_synthetic_cost_table_shape(bench: ModuleType) -> None:
    table = bench.synthetic_cost_table(100)
    assert len(table["layers"]) == len(table["cost"]) == 100
    assert all(len(row) == len(table["bits"]) for row in table["cost"])
    assert all(row == sorted(row, reverse=True) for row in table["cost"])
    assert table["layers"][0]["pinned_bits"] == table["layers"][-1]["pinned_bits"] == 8
    assert bench.synthetic_cost_table(100) == table  # seeded


def test_bench_spec_is_a_valid_one_width_job_without_report(
    bench: ModuleType, tmp_path: Path
) -> None:
    from allocator.job import JobSpec

    spec = JobSpec.from_dict(bench.bench_spec(tmp_path))
    spec.validate()
    assert tuple(spec.bits) == (8,)
    assert spec.model == "tiny:cnn"
    assert not spec.report and not spec.report_widths


def test_keep_alive_client_reads_whole_responses_over_one_connection() -> None:
    """The load generator times a GET until its body is read; a misparsed response would time
    the wrong thing or poison the next GET on the same connection."""
    import asyncio
    import contextlib

    connections = 0
    paths: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        with contextlib.suppress(asyncio.IncompleteReadError):  # the client hung up
            while request := await reader.readuntil(b"\r\n\r\n"):
                paths.append(request.split(b" ")[1])
                if b"Authorization: Bearer k" not in request:
                    writer.write(b"HTTP/1.1 401 Unauthorized\r\ncontent-length: 0\r\n\r\n")
                elif request.startswith(b"GET /bare"):
                    writer.write(b"HTTP/1.1 200 OK\r\n\r\n")
                else:
                    writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n{..}\n")
                await writer.drain()

    async def scenario() -> list[int]:
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        client = KeepAliveClient(f"http://127.0.0.1:{port}", {"Authorization": "Bearer k"})
        statuses = [await client.get(f"/v1/jobs/{index}") for index in range(3)]
        with pytest.raises(ConnectionError):
            await client.get("/bare")
        statuses.append(await client.get("/after"))
        client.close()
        server.close()
        return statuses

    assert asyncio.run(scenario()) == [200, 200, 200, 200]
    assert paths == [b"/v1/jobs/0", b"/v1/jobs/1", b"/v1/jobs/2", b"/bare", b"/after"]
    assert connections == 2  # kept alive; the failed exchange's connection was not reused


def test_keep_alive_client_resends_a_get_the_server_dropped_on_a_kept_connection() -> None:
    """uvicorn closes keep-alive connections idle for 5 s; a GET written onto one just as it
    closes must go out again on a new connection, not count as a server failure."""
    import asyncio
    import contextlib

    connections = 0

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        with contextlib.suppress(asyncio.IncompleteReadError):
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}")
            await writer.drain()
            await reader.readuntil(b"\r\n\r\n")  # the next request on this connection: dropped
        writer.close()

    async def scenario() -> list[int]:
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        client = KeepAliveClient(f"http://127.0.0.1:{port}", {})
        statuses = [await client.get("/a"), await client.get("/b")]
        client.close()
        server.close()
        return statuses

    assert asyncio.run(scenario()) == [200, 200]
    assert connections == 2
