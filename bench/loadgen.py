"""The HTTP load client of the service benches: open-loop GETs, concurrent POSTs, re-solves.

`KeepAliveClient` is a minimal keep-alive HTTP/1.1 GET client on asyncio streams, because the
load generator shares the cores with the server it measures: whatever the client burns, the
server's cores lose. `open_loop` schedules requests at fixed intervals whether or not earlier
ones answered, so a slow server shows up as latency, not as a politely lower request rate.

Imports httpx and uvloop; never tests, never a server (bench/deploy.py starts those).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import uvloop


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100), linearly interpolated as numpy's default; nan when empty."""
    if not values:
        return math.nan
    if not 0 <= q <= 100:
        raise ValueError(f"percentile {q} is not in [0, 100]")
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


@dataclass(frozen=True)
class LoadResult:
    """One open-loop run: latencies in seconds, from the actual send and from the schedule."""

    offered_rps: float
    seconds: float
    sent: int
    errors: int
    latencies: tuple[float, ...]
    scheduled_latencies: tuple[float, ...]
    failures: dict[str, int] = field(default_factory=dict)
    """Failed GETs by HTTP status or exception."""

    @property
    def achieved_rps(self) -> float:
        return (self.sent - self.errors) / self.seconds if self.seconds > 0 else math.nan

    @property
    def p99(self) -> float:
        return percentile(self.latencies, 99)

    def passes(self, target_ms: float) -> bool:
        return self.errors == 0 and self.p99 * 1000 <= target_ms


class StaleConnection(ConnectionError):
    """A kept-alive connection the server closed before it answered anything."""


class KeepAliveClient:
    """GET over a pool of keep-alive HTTP/1.1 connections, written out on asyncio streams.

    The load generator shares two cores with the API processes and PostgreSQL, so its own CPU
    per request is latency the server is charged for: an httpx AsyncClient spent 0.83-0.90 ms
    of CPU per GET, this (on uvloop) 0.14 ms, measured side by side against `/healthz`. It is
    what wrk would be, were there an open-loop wrk here, and it reads exactly what uvicorn
    sends: a status line, headers with Content-Length, a body.
    """

    def __init__(self, url: str, headers: dict[str, str], timeout: float = 10.0) -> None:
        parts = urlsplit(url)
        if parts.scheme != "http" or parts.hostname is None or parts.port is None:
            raise ValueError(f"{url}: expected http://HOST:PORT")
        self.host, self.port, self.timeout = parts.hostname, parts.port, timeout
        self.head = f"Host: {parts.netloc}\r\n" + "".join(
            f"{name}: {value}\r\n" for name, value in headers.items()
        )
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def get(self, path: str) -> int:
        """The response's status; the connection goes back to the pool only after a whole
        response was read, so a failure never leaves a half-read stream for the next GET.

        uvicorn closes a keep-alive connection idle for 5 s, and a pool that grew in a burst
        holds such connections: one the server has closed is dropped, and a GET whose reused
        connection closes before a single byte of answer is sent again once on a new one, as
        HTTP clients do for idempotent requests."""
        while self.idle:
            reader, writer = self.idle.pop()
            if not reader.at_eof():
                break
            writer.close()
        else:
            return await self._on_new_connection(path)
        try:
            return await self._over(reader, writer, path)
        except StaleConnection:
            return await self._on_new_connection(path)

    async def _on_new_connection(self, path: str) -> int:
        reader, writer = await asyncio.open_connection(self.host, self.port)
        return await self._over(reader, writer, path)

    async def _over(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, path: str
    ) -> int:
        try:
            status = await asyncio.wait_for(self._exchange(reader, writer, path), self.timeout)
        except BaseException:
            writer.close()
            raise
        self.idle.append((reader, writer))
        return status

    async def _exchange(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, path: str
    ) -> int:
        writer.write(f"GET {path} HTTP/1.1\r\n{self.head}\r\n".encode())
        status_line = await reader.readline()
        if not status_line:
            raise StaleConnection("the server closed the connection before answering")
        status = int(status_line.split()[1])
        length = None
        while (line := await reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        if length is None:
            raise ConnectionError("response without Content-Length")
        await reader.readexactly(length)
        return status

    def close(self) -> None:
        for _, writer in self.idle:
            writer.close()
        self.idle.clear()


async def open_loop(
    url: str, headers: dict[str, str], path: str, rate: float, seconds: float
) -> LoadResult:
    """`rate * seconds` GETs, the i-th sent at start + i / rate regardless of the others."""
    count = max(1, int(rate * seconds))
    latencies: list[float] = []
    scheduled_latencies: list[float] = []
    failures: Counter[str] = Counter()
    client = KeepAliveClient(url, headers)
    try:
        await client.get(path)  # warm the connection and the route

        async def one(scheduled: float) -> None:
            sent = time.perf_counter()
            try:
                status = await client.get(path)
                failure = None if status == 200 else f"HTTP {status}"
            except (TimeoutError, OSError, EOFError, ValueError, IndexError) as error:
                failure = type(error).__name__
            done = time.perf_counter()
            if failure is None:
                latencies.append(done - sent)
                scheduled_latencies.append(done - scheduled)
            else:
                failures[failure] += 1

        start = time.perf_counter() + 0.05
        tasks = []
        for index in range(count):
            scheduled = start + index / rate
            delay = scheduled - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(scheduled)))
        await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - start
    finally:
        client.close()
    return LoadResult(
        rate,
        elapsed,
        count,
        failures.total(),
        tuple(latencies),
        tuple(scheduled_latencies),
        dict(failures),
    )


async def submit_jobs(
    url: str, headers: dict[str, str], body: dict[str, Any], count: int, concurrency: int
) -> tuple[list[str], float, list[float]]:
    """POST `count` jobs, `concurrency` at a time: (ids, seconds, per-request latencies).

    The first is a warm-up, queued like the rest but outside the timing."""
    import httpx

    ids: list[str] = []
    latencies: list[float] = []
    queue: asyncio.Queue[int] = asyncio.Queue()
    for index in range(count - 1):
        queue.put_nowait(index)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=60.0) as client:
        warm = await client.post("/v1/jobs", json=body)  # untimed: first-request imports
        if warm.status_code != 202:
            raise RuntimeError(f"POST /v1/jobs: {warm.status_code} {warm.text}")
        ids.append(warm.json()["id"])

        async def submitter() -> None:
            while True:
                try:
                    queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                sent = time.perf_counter()
                response = await client.post("/v1/jobs", json=body)
                latencies.append(time.perf_counter() - sent)
                if response.status_code != 202:
                    raise RuntimeError(f"POST /v1/jobs: {response.status_code} {response.text}")
                ids.append(response.json()["id"])

        start = time.perf_counter()
        await asyncio.gather(*(submitter() for _ in range(concurrency)))
        seconds = time.perf_counter() - start
    return ids, seconds, latencies


def client_cpu_per_get(url: str, headers: dict[str, str], count: int = 1000) -> dict:
    """Milliseconds of this process's CPU per GET of /healthz at 200 rps, for httpx's
    AsyncClient on asyncio and for `KeepAliveClient` on uvloop: why the latency loads use the
    latter (whatever the client burns, the server's cores lose)."""
    import httpx

    async def paced(get: Callable[[], Any]) -> float:
        started = time.process_time()
        tasks = []
        for _ in range(count):
            tasks.append(asyncio.create_task(get()))
            await asyncio.sleep(1 / 200)
        await asyncio.gather(*tasks)
        return (time.process_time() - started) / count * 1000

    async def with_httpx() -> float:
        async with httpx.AsyncClient(base_url=url, headers=headers) as client:
            return await paced(lambda: client.get("/healthz"))

    async def with_keep_alive() -> float:
        client = KeepAliveClient(url, headers)
        try:
            return await paced(lambda: client.get("/healthz"))
        finally:
            client.close()

    return {
        "httpx AsyncClient (asyncio)": asyncio.run(with_httpx()),
        "KeepAliveClient (uvloop)": uvloop.run(with_keep_alive()),
    }


def resolve_latencies(url: str, key: str, profile_id: str, count: int) -> tuple[list[float], int]:
    """`count` sequential re-solves, each at a budget not asked before."""
    from service.client import ApiError, BitplanClient

    latencies: list[float] = []
    errors = 0
    with BitplanClient(url, key) as client:
        client.solve_profile(profile_id, "avg-bits=5")  # warm up
        for index in range(count):
            budget = f"avg-bits={3.0 + 4.0 * index / max(count, 1):.4f}"
            sent = time.perf_counter()
            try:
                client.solve_profile(profile_id, budget)
            except ApiError:
                errors += 1
                continue
            latencies.append(time.perf_counter() - sent)
    return latencies, errors
