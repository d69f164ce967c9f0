"""A real bitplan deployment on loopback, started the same way by the end-to-end tests and benches.

`bitplan serve` as its own process (one or `--processes N`), Celery workers started the way
`bitplan worker` does, the `bitplan` CLI as a subprocess, a throwaway PostgreSQL database and a
flushed Redis database, and a throwaway model-source plugin (`tiny:` and `crash:`) registered
through the `bitplan.models` entry-point group, as a team adds a model source. The API process
of a URL and its resident memory can be read back, for benches that watch it grow.

Used by tests/ (HTTP, browser and worker-fault tests) and by bench/service_load.py and
bench/abuse.py, so each starts a deployment the same way. Every process is stopped and every
database dropped when its context ends, even on failure.

Imports numpy, httpx and psycopg; never tests, never torch (the plugin imports it in the server).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
SERVER_START_SECONDS = 120
WORKER_COMMAND = (
    sys.executable,
    "-c",
    "from workers.celery_app import start_worker; start_worker(('interactive', 'batch'), 1)",
)
"""A Celery worker on both queues, one job at a time, as `bitplan worker` starts it."""

PLUGIN_MODULE = "bitplan_test_models"
PLUGIN_SOURCE = '''
"""Model sources for bitplan's service tests and load bench, loaded through `bitplan.models`."""

import os

import torch
from torch import nn

from allocator.zoo.base import LoadedModel


def crash(name, weights):
    os._exit(70)


def tiny(name, weights):
    torch.manual_seed(0)
    module = nn.Sequential(
        nn.Conv2d(3, 2, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 4 * 4, 10)
    )
    return LoadedModel(
        ref=f"tiny:{name}", module=module, task="classification", input_kind="image",
        image_size=4, num_classes=10,
    )
'''


# --- the model-source plugin -------------------------------------------------------------------


def write_plugins(root: Path) -> Path:
    """`root` made into a folder that, on PYTHONPATH, looks like an installed distribution
    registering the `tiny:` (a 2-channel CNN on 4x4 images) and `crash:` (kills its process)
    model sources, plus `tiny.npz`, 32 random images for them. Entry points are how a team adds
    a model source, so worker processes find these the same way."""
    root.mkdir(parents=True, exist_ok=True)
    (root / f"{PLUGIN_MODULE}.py").write_text(PLUGIN_SOURCE)
    dist_info = root / f"{PLUGIN_MODULE}-0.dist-info"
    dist_info.mkdir(exist_ok=True)
    (dist_info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {PLUGIN_MODULE.replace('_', '-')}\nVersion: 0\n"
    )
    (dist_info / "entry_points.txt").write_text(
        f"[bitplan.models]\ncrash = {PLUGIN_MODULE}:crash\ntiny = {PLUGIN_MODULE}:tiny\n"
    )
    rng = np.random.default_rng(0)
    np.savez(
        root / "tiny.npz",
        images=rng.integers(0, 256, (32, 4, 4, 3), dtype=np.uint8),
        labels=rng.integers(0, 10, 32),
    )
    return root


def tiny_spec(plugins: Path, **overrides: Any) -> dict[str, Any]:
    """A job spec that runs in a second on the `tiny:` model of `write_plugins(plugins)`."""
    return {
        "model": "tiny:cnn",
        "calib": str(plugins / "tiny.npz"),
        "budget": "avg-bits=6",
        "method": "fisher",
        "bits": [4, 8],
        "calib_samples": 8,
        "batch_size": 8,
        "pin_first_last": False,
        "bias_correction": False,
        **overrides,
    }


# --- processes ---------------------------------------------------------------------------------


class CommandFailed(RuntimeError):
    """A `bitplan` subcommand exited non-zero; the message carries its stderr."""


def bitplan(*args: str, env: dict[str, str], timeout: float = 120) -> str:
    """Run `bitplan ARGS` with `env` and return its stdout; CommandFailed unless it exits 0."""
    done = subprocess.run(
        [sys.executable, "-m", "service.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if done.returncode != 0:
        raise CommandFailed(f"bitplan {' '.join(args)} exited {done.returncode}: {done.stderr}")
    return done.stdout


def create_key(env: dict[str, str], tenant: str) -> str:
    """A new API key for `tenant`, made by `bitplan keys create` on the deployment's database."""
    return bitplan("keys", "create", "--tenant", tenant, env=env).strip()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_for(
    condition: Callable[[], bool],
    timeout: float,
    what: str | Callable[[], str],
    interval: float = 0.1,
) -> None:
    """Poll `condition`; TimeoutError after `timeout` seconds, naming `what` (a callable is
    asked only then, so it can show logs as they are by then)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            text = what() if callable(what) else what
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {text}")
        time.sleep(interval)


def log_tail(path: Path, lines: int = 20) -> str:
    if not path.exists():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def spawn(
    args: list[str] | tuple[str, ...], env: dict[str, str], log: Path, cwd: Path | None = None
) -> subprocess.Popen[bytes]:
    """`args` in a process group of its own (so `stop` or a SIGKILL reaches its children), its
    output appended to `log`."""
    with log.open("ab") as out:
        return subprocess.Popen(
            args, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )


def stop(process: subprocess.Popen[bytes], timeout: float = 30) -> None:
    """SIGTERM the process group it leads (a warm Celery shutdown), SIGKILL if it lingers."""
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(10)


def start_api(
    env: dict[str, str],
    log: Path,
    *,
    processes: int = 1,
    log_level: str | None = None,
    cwd: Path | None = None,
    timeout: float = SERVER_START_SECONDS,
) -> tuple[subprocess.Popen[bytes], str]:
    """`bitplan serve` on a free loopback port, once `/readyz` answers: (process, base URL).
    The caller stops it (`stop`)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    args = [sys.executable, "-m", "service.cli", "serve", "--host", "127.0.0.1", "--port"]
    args += [str(port), *(("--processes", str(processes)) if processes > 1 else ())]
    args += ("--log-level", log_level) if log_level else ()
    process = spawn(args, env, log, cwd)

    def ready() -> bool:
        if process.poll() is not None:
            raise RuntimeError(f"bitplan serve exited: {log_tail(log)}")
        try:
            return httpx.get(f"{url}/readyz", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    try:
        wait_for(ready, timeout, "bitplan serve to answer /readyz", interval=0.5)
    except BaseException:
        stop(process)
        raise
    return process, url


@contextlib.contextmanager
def serving(env: dict[str, str], log_path: Path, processes: int = 1) -> Iterator[str]:
    """`bitplan serve` (with the executor `env` names) until the block ends; yields its base URL
    once `/readyz` answers, its output goes to `log_path`."""
    log_path.write_bytes(b"")
    process, url = start_api(env, log_path, processes=processes)
    try:
        yield url
    finally:
        stop(process, timeout=60)


def server_pid(url: str) -> int:
    """The `bitplan serve` process listening on `url`'s port, found by its command line."""
    port = url.rsplit(":", 1)[1]
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            words = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"serve" in words and port.encode() in words:
            return int(proc.name)
    raise RuntimeError(f"no bitplan serve process for {url}")


def resident_mb(pid: int) -> float:
    """The resident memory of process `pid` in MiB, read from /proc (Linux only)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


class Deployment:
    """An API process and Celery workers sharing one environment; `close` stops them all."""

    def __init__(self, folder: Path, env: dict[str, str]) -> None:
        self.folder = folder
        self.env = env
        self.processes: list[subprocess.Popen[bytes]] = []
        self.url = ""

    def start_api(self, processes: int, timeout: float = SERVER_START_SECONDS) -> str:
        process, self.url = start_api(
            self.env,
            self.folder / "api.log",
            processes=processes,
            log_level="warning",
            cwd=REPO_ROOT,
            timeout=timeout,
        )
        self.processes.append(process)
        return self.url

    def create_key(self, tenant: str) -> str:
        return create_key(self.env, tenant)

    def start_workers(self, count: int, timeout: float = 120) -> None:
        logs = [self.folder / f"worker-{index}.log" for index in range(count)]
        started = [spawn(WORKER_COMMAND, self.env, log, REPO_ROOT) for log in logs]
        self.processes += started

        def ready() -> bool:
            for process, log in zip(started, logs, strict=True):
                if process.poll() is not None:
                    raise RuntimeError(f"a worker exited: {log_tail(log)}")
            return all(" ready." in log.read_text(errors="replace") for log in logs)

        wait_for(ready, timeout, "the workers to be ready")

    def close(self) -> None:
        for process in reversed(self.processes):
            stop(process)


# --- databases ---------------------------------------------------------------------------------


@contextlib.contextmanager
def throwaway_database(admin_url: str, prefix: str = "bitplan") -> Iterator[str]:
    """A new `<prefix>_<random>` PostgreSQL database, dropped when the block ends; yields its
    URL. Raises psycopg.OperationalError when the server at `admin_url` is unreachable."""
    import psycopg
    from psycopg import sql
    from sqlalchemy import make_url

    name = f"{prefix}_{secrets.token_hex(4)}"
    with psycopg.connect(admin_url, autocommit=True, connect_timeout=3) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        try:
            yield make_url(admin_url).set(database=name).render_as_string(hide_password=False)
        finally:
            admin.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))


@contextlib.contextmanager
def flushed_redis(url: str) -> Iterator[str]:
    """The Redis database at `url`, emptied before and after the block."""
    import redis

    client = redis.Redis.from_url(url)
    client.flushdb()
    try:
        yield url
    finally:
        client.flushdb()
        client.close()
