"""`bitplan serve` as its own process on loopback, and the `bitplan` CLI as a subprocess: what the
end-to-end tests (HTTP, browser) share, so each starts a real deployment the same way."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

SERVER_START_SECONDS = 120


def bitplan(*args: str, env: dict[str, str], timeout: float = 120) -> str:
    """Run `bitplan ARGS` with `env`; fails the test with its stderr unless it exits 0."""
    done = subprocess.run(
        [sys.executable, "-m", "service.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert done.returncode == 0, f"bitplan {' '.join(args)} exited {done.returncode}: {done.stderr}"
    return done.stdout


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def serving(env: dict[str, str], log_path: Path) -> Iterator[str]:
    """`bitplan serve` (uvicorn, with the executor `env` names) on a free loopback port until the
    block ends; yields its base URL once `/readyz` answers, its output goes to `log_path`."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "service.cli",
                "serve",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
            ],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + SERVER_START_SECONDS
            while not _answers(url):
                assert process.poll() is None, log_path.read_text()
                assert time.monotonic() < deadline, "bitplan serve did not start"
                time.sleep(0.5)
            yield url
        finally:
            process.terminate()
            process.wait(60)


def _answers(url: str) -> bool:
    try:
        return httpx.get(f"{url}/readyz", timeout=2).status_code == 200
    except httpx.TransportError:
        return False
