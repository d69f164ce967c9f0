"""The attacks of issue 10 on a live server, each a function from the attacked server
(`Target`) to table rows, and the server they expect: small quotas and rate limits so the
quota rows are reachable, a "secret" file outside the allowed roots, a symlink out of one.

bench/abuse.py runs them in `ATTACKS` order against a `bitplan serve` it starts; a row is ok
when the status is the expected refusal.

Imports httpx and numpy; never tests.
"""

from __future__ import annotations

import io
import json
import os
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from bench.deploy import create_key

ACTIVE_JOBS_QUOTA = 5
STORED_BYTES_QUOTA = 4 << 20
AUTH_FAILURES_PER_MINUTE = 20
RATE_PER_SECOND = 5
RATE_BURST = 50
BURST_CLIENTS = 16
LATER = "2999-01-01T00:00:00Z"
"""A not-before that keeps accepted jobs queued: this bench measures refusals, not jobs."""


@dataclass
class Row:
    """One line of the report: what was sent, what came back, and whether it was expected."""

    attack: str
    status: int | str
    message: str
    expected: str
    ok: bool


@dataclass
class Target:
    """The attacked server: a tenant's headers (`other`: the second tenant's), its uploaded
    calibration set, and the server paths no tenant may reach."""

    url: str
    headers: dict[str, str]
    other: dict[str, str]
    calib_ref: str
    secret: Path
    allowed: Path

    def post_job(self, spec: dict[str, Any], **extra: Any) -> httpx.Response:
        """POST a job whose spec is a valid one overridden by `spec`, held until `LATER` so an
        accepted job never runs."""
        body = {"spec": {"model": "zoo:cifar_resnet20", "calib": self.calib_ref, **spec}}
        return httpx.post(
            f"{self.url}/v1/jobs",
            headers=self.headers,
            json={**body, "not_before": LATER, **extra},
            timeout=60,
        )


# --- the server they expect ---------------------------------------------------------------------


def environment(root: Path, database_url: str | None) -> dict[str, str]:
    """The server's environment, and under `root` the files the path attacks aim at; SQLite
    in `root` when `database_url` is None."""
    allowed = root / "allowed"
    allowed.mkdir()
    (root / "secret.th").write_bytes(b"not for tenants")
    (allowed / "escape.npz").symlink_to(root / "secret.th")
    env = {
        **os.environ,
        "BITPLAN_HOME": str(root / "home"),
        "BITPLAN_EXECUTOR": "inline",
        "BITPLAN_ALLOWED_INPUT_ROOTS": json.dumps([str(allowed)]),
        "BITPLAN_WEBHOOK_SECRET": "abuse-bench",
        "BITPLAN_MAX_ACTIVE_JOBS_PER_TENANT": str(ACTIVE_JOBS_QUOTA),
        "BITPLAN_MAX_STORED_BYTES_PER_TENANT": str(STORED_BYTES_QUOTA),
        "BITPLAN_AUTH_FAILURES_PER_MINUTE": str(AUTH_FAILURES_PER_MINUTE),
        "BITPLAN_RATE_LIMIT_PER_SECOND": str(RATE_PER_SECOND),
        "BITPLAN_RATE_LIMIT_BURST": str(RATE_BURST),
        "OMP_NUM_THREADS": "1",
    }
    if database_url:
        env["BITPLAN_DATABASE_URL"] = database_url
    return env


def setup(url: str, env: dict[str, str], root: Path) -> Target:
    """Two tenants with used keys and an uploaded calibration set: the state every attack
    starts from."""
    keys = [create_key(env, tenant) for tenant in ("acme", "globex")]
    headers, other = ({"Authorization": f"Bearer {key}"} for key in keys)
    for known in (headers, other):  # both tenants have used their keys before any attack
        httpx.get(f"{url}/v1/jobs", headers=known, timeout=60).raise_for_status()
    upload = httpx.post(
        f"{url}/v1/datasets", headers=headers, files={"file": ("calib.npz", _npz())}, timeout=60
    )
    upload.raise_for_status()
    return Target(url, headers, other, upload.json()["ref"], root / "secret.th", root / "allowed")


def _npz(**arrays: np.ndarray) -> bytes:
    """`arrays` as a compressed .npz archive; by default a small valid calibration set."""
    buffer = io.BytesIO()
    if not arrays:
        rng = np.random.default_rng(0)
        arrays = {
            "images": rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8),
            "labels": np.arange(8) % 10,
        }
    np.savez_compressed(buffer, **arrays)
    return buffer.getvalue()


# --- the attacks -------------------------------------------------------------------------------

REFUSED = (422,)


def _row(attack: str, response: httpx.Response, expected: tuple[int, ...]) -> Row:
    status = response.status_code
    return Row(attack, status, _message(response), "/".join(map(str, expected)), status in expected)


def _message(response: httpx.Response) -> str:
    try:
        return str(response.json().get("detail", ""))
    except ValueError:
        return response.text


def model_refs(target: Target) -> list[Row]:
    cases = [
        (
            "timm option checkpoint_path=<server file>",
            f"timm:resnet18?checkpoint_path={target.secret}",
        ),
        ("timm option pretrained_cfg_overlay", "timm:resnet18?pretrained_cfg_overlay=x"),
        ("timm option global_pool=<path>", "timm:resnet18?global_pool=/etc/hostname"),
        ("timm img_size=100000", "timm:vit_tiny_patch16_224?img_size=100000"),
        ("timm num_classes=1e9", "timm:resnet18?num_classes=1000000000"),
        ("unknown timm name", "timm:resnet181"),
        ("unknown zoo name", "zoo:cifar_resnet21"),
        ("hf: folder outside the roots", f"hf:{target.secret.parent}"),
        ("unknown model source", "nosuchplugin:x?checkpoint_path=/etc/hostname"),
        ("ViT-L at batch 1024 (memory)", "timm:vit_large_patch16_224"),
    ]
    return [
        _row(
            attack,
            target.post_job({"model": ref, "batch_size": 1024 if "memory" in attack else 32}),
            REFUSED,
        )
        for attack, ref in cases
    ]


def paths(target: Target) -> list[Row]:
    cases = [
        ("calib: server path outside the roots", str(target.secret)),
        ("calib: .. out of an allowed root", f"{target.allowed}/../secret.th"),
        ("calib: symlink out of an allowed root", str(target.allowed / "escape.npz")),
        ("weights: /etc/hostname", "/etc/hostname"),
    ]
    return [
        _row(attack, target.post_job({"weights" if "weights" in attack else "calib": ref}), REFUSED)
        for attack, ref in cases
    ]


def uploads(target: Target) -> list[Row]:
    bomb = _npz(images=np.zeros((100, 1000, 1000, 3), np.uint8), labels=np.zeros(100, np.int64))
    cases = [
        (f"npz bomb ({len(bomb) // 1024} KB, 300 MB declared)", "bomb.npz", bomb, (413, 422)),
        ("random bytes named .npz", "noise.npz", os.urandom(4096), REFUSED),
        (
            f"upload above the storage quota ({STORED_BYTES_QUOTA >> 20} MiB)",
            "big.npz",
            os.urandom(STORED_BYTES_QUOTA + 1),
            (413,),
        ),
    ]
    rows = []
    for attack, name, data, expected in cases:
        response = httpx.post(
            f"{target.url}/v1/datasets",
            headers=target.headers,
            files={"file": (name, data)},
            timeout=120,
        )
        rows.append(_row(attack, response, expected))
    return rows


def spec_numbers(target: Target) -> list[Row]:
    cases: list[tuple[str, dict[str, Any]]] = [
        ("bits [1000]", {"bits": [1000]}),
        ("bits [0, -1]", {"bits": [0, -1]}),
        ("time_limit -1", {"time_limit": -1}),
        ("time_limit 1e308", {"time_limit": 1e308}),
        ("eval_samples -5", {"eval_samples": -5}),
        ("pins conv1=99999", {"pins": {"conv1": 99999}}),
        ("batch_size 1e12", {"batch_size": 10**12}),
        ("calib_samples 1e12", {"calib_samples": 10**12}),
    ]
    rows = [_row(attack, target.post_job(spec), REFUSED) for attack, spec in cases]
    for literal in ("NaN", "Infinity"):
        body = json.dumps(
            {"spec": {"model": "zoo:cifar_resnet20", "calib": target.calib_ref, "time_limit": 0}}
        ).replace('"time_limit": 0', f'"time_limit": {literal}')
        response = httpx.post(
            f"{target.url}/v1/jobs",
            headers={**target.headers, "Content-Type": "application/json"},
            content=body,
            timeout=60,
        )
        rows.append(_row(f"time_limit {literal}", response, REFUSED))
    return rows


def webhooks(target: Target) -> list[Row]:
    urls = [
        "http://127.0.0.1:6379/",
        f"{target.url}/v1/jobs",
        "http://10.0.0.1/hook",
        "http://169.254.169.254/latest/meta-data",
        "http://[::1]/hook",
        "http://[::ffff:127.0.0.1]/hook",
    ]
    return [_row(f"callback {url}", target.post_job({}, callback_url=url), REFUSED) for url in urls]


def throttles(target: Target) -> list[Row]:
    """The other tenant's burst first: the bad-key flood then throttles this address for keys
    the server has not verified yet, which is what it is for."""
    with ThreadPoolExecutor(BURST_CLIENTS) as pool:  # all at once, however slow the machine
        burst = list(
            pool.map(
                lambda _: httpx.get(f"{target.url}/v1/jobs?limit=1", headers=target.other),
                range(RATE_BURST * 3),
            )
        )
    limited = [r for r in burst if r.status_code == 429]
    rows = [
        Row(
            f"{len(burst)} GETs at once on one key ({RATE_PER_SECOND}/s, burst {RATE_BURST})",
            f"{len(burst) - len(limited)}x200 {len(limited)}x429",
            f"Retry-After {limited[0].headers.get('Retry-After')}: {_message(limited[0])}"
            if limited
            else "",
            "some 429",
            bool(limited),
        ),
        _row("/metrics without a key", httpx.get(f"{target.url}/metrics"), (401,)),
    ]
    bad = [
        httpx.get(f"{target.url}/v1/jobs", headers={"Authorization": f"Bearer bp_0000_{i}"})
        for i in range(50)
    ]
    statuses = Counter(response.status_code for response in bad)
    limit = AUTH_FAILURES_PER_MINUTE
    rows.append(
        Row(
            "50 bad keys from one address",
            " ".join(f"{n}x{status}" for status, n in sorted(statuses.items())),
            _message(bad[-1]),
            f"{limit}x401 {50 - limit}x429",
            statuses == Counter({401: limit, 429: 50 - limit}),
        )
    )
    known = httpx.get(f"{target.url}/v1/jobs?limit=1", headers=target.headers)
    rows.append(_row("a known key from that address, right after", known, (200,)))
    return rows


def quotas(target: Target) -> list[Row]:
    accepted = [target.post_job({}) for _ in range(ACTIVE_JOBS_QUOTA)]
    assert all(r.status_code == 202 for r in accepted), [r.text for r in accepted]
    return [
        _row(f"job {ACTIVE_JOBS_QUOTA + 1} over the active-jobs quota", target.post_job({}), (429,))
    ]


ATTACKS: tuple[Callable[[Target], list[Row]], ...] = (
    model_refs,
    paths,
    uploads,
    spec_numbers,
    webhooks,
    throttles,
    quotas,
)
"""`quotas` last: it fills the tenant's job quota, after which every job is a 429."""
