"""`bitplan serve` as its own process on loopback, the `bitplan` CLI as a subprocess, and a
throwaway model-source plugin: what the end-to-end tests (HTTP, browser, worker faults) and
`bench/service_load.py` share, so each starts a real deployment the same way."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np

SERVER_START_SECONDS = 120

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
        return int(probe.getsockname()[1])


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
