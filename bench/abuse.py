"""What a hostile tenant gets from a live server: every attack of issue 10, plus fuzzed specs.

Starts a real `bitplan serve` (inline executor, on a fresh PostgreSQL database when one is
reachable, else SQLite) on loopback, with two tenants, a server folder outside the allowed roots
holding a "secret" file, and small quotas so the quota rows are reachable. Then it sends, over
real HTTP:

- model-reference options that open files or allocate without bound, unknown model names, an
  `hf:` folder outside the allowed roots, paths with `..` and a symlink out of an allowed root;
- a decompression bomb, random bytes named `.npz`, a dataset above the storage quota;
- spec numbers out of every bound, NaN and Infinity among them;
- callback URLs at loopback, private, link-local and metadata addresses;
- a burst of bad keys from one address, a burst of good requests on one key, more active jobs
  than the tenant's quota, `/metrics` without a key;
- `--fuzz N` specs whose every field is drawn (seeded) from hostile values.

It prints one row per request kind (status, the server's message), the statuses of the fuzzed
specs, and the API process's resident memory before and after. It exits 1 when any request got
a 5xx or an unexpected status, or memory grew by more than `--max-growth-mb`.

Run: `.venv/bin/python bench/abuse.py [--fuzz 300]`; the tables also go to bench/out/abuse.md.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psycopg

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
from bench.deploy import create_key, serving, throwaway_database  # noqa: E402

OUT = REPO_ROOT / "bench" / "out" / "abuse.md"
POSTGRES_ADMIN_URL = os.environ.get(
    "BITPLAN_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
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
    attack: str
    status: int | str
    message: str
    expected: str
    ok: bool


@dataclass
class Target:
    url: str
    headers: dict[str, str]
    other: dict[str, str]
    calib_ref: str
    secret: Path
    allowed: Path

    def post_job(self, spec: dict[str, Any], **extra: Any) -> httpx.Response:
        body = {"spec": {"model": "zoo:cifar_resnet20", "calib": self.calib_ref, **spec}}
        return httpx.post(
            f"{self.url}/v1/jobs",
            headers=self.headers,
            json={**body, "not_before": LATER, **extra},
            timeout=60,
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fuzz", type=int, default=300, help="fuzzed specs to send")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-growth-mb", type=float, default=50.0)
    parser.add_argument("--out", type=Path, default=OUT, help="where the tables go too")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bitplan-abuse-") as folder, _database() as db:
        root = Path(folder)
        env = _environment(root, db)
        with serving(env, root / "serve.log") as url:
            pid = _server_pid(url)
            target = _setup(url, env, root)
            before = _rss_mb(pid)
            rows = [row for attack in ATTACKS for row in attack(target)]
            fuzzed = _fuzz(target, args.fuzz, args.seed)
            after = _rss_mb(pid)
    report = _report(rows, fuzzed, before, after, args, "PostgreSQL" if db else "SQLite")
    print(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report + "\n")
    failed = [row for row in rows if not row.ok]
    return 1 if failed or _server_errors(fuzzed) or after - before > args.max_growth_mb else 0


def _server_errors(statuses: Counter[int | str]) -> int:
    """5xx answers and requests the server dropped."""
    return sum(n for status, n in statuses.items() if not isinstance(status, int) or status >= 500)


# --- the deployment ----------------------------------------------------------------------------


@contextmanager
def _database() -> Iterator[str | None]:
    """A fresh PostgreSQL database for the run (dropped after), or None for SQLite."""
    with ExitStack() as stack:
        try:
            url = stack.enter_context(throwaway_database(POSTGRES_ADMIN_URL, "bitplan_abuse"))
        except psycopg.OperationalError:
            url = None
        yield url


def _environment(root: Path, database_url: str | None) -> dict[str, str]:
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


def _setup(url: str, env: dict[str, str], root: Path) -> Target:
    keys = [create_key(env, tenant) for tenant in ("acme", "globex")]
    headers, other = ({"Authorization": f"Bearer {key}"} for key in keys)
    for known in (headers, other):  # both tenants have used their keys before any attack
        httpx.get(f"{url}/v1/jobs", headers=known, timeout=60).raise_for_status()
    upload = httpx.post(
        f"{url}/v1/datasets", headers=headers, files={"file": ("calib.npz", _npz())}, timeout=60
    )
    upload.raise_for_status()
    return Target(url, headers, other, upload.json()["ref"], root / "secret.th", root / "allowed")


def _server_pid(url: str) -> int:
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


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def _npz(**arrays: np.ndarray) -> bytes:
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


# --- fuzzed specs ------------------------------------------------------------------------------

HOSTILE_NUMBERS = (
    "NaN",
    "Infinity",
    "-Infinity",
    "1e308",
    "-1e308",
    "-1",
    "0",
    "1e400",
    "9223372036854775808",
    "-9223372036854775809",
    "2.5",
    "true",
    "null",
)
HOSTILE_TEXT = (
    '"../../etc/passwd"',
    '"/etc/shadow"',
    '"\\u0000"',
    '"' + "x" * 5000 + '"',
    '"timm:resnet18?checkpoint_path=/etc/passwd"',
    '"upload:../../x"',
    '""',
    '"\\ud800"',
    "{}",
    "[]",
    "[[[]]]",
)
FIELDS = (
    "model",
    "calib",
    "weights",
    "eval",
    "budget",
    "method",
    "bits",
    "calib_samples",
    "batch_size",
    "eval_samples",
    "pins",
    "time_limit",
    "seed",
    "act_bits",
    "act_quantizers",
    "pin_first_last",
    "report",
)


def _fuzz(target: Target, count: int, seed: int) -> Counter[int | str]:
    """`count` specs, each with 1-4 fields set to a hostile literal, sent as raw JSON (NaN and
    Infinity included, which `json` writes and Python servers read). Uses the other tenant:
    the first one's job quota is full."""
    rng = random.Random(seed)
    statuses: Counter[int | str] = Counter()
    pool = HOSTILE_NUMBERS + HOSTILE_TEXT
    base = {"model": '"zoo:cifar_resnet20"', "calib": '"/nonexistent.npz"'}
    with httpx.Client(base_url=target.url, headers=target.other, timeout=60) as client:
        for index in range(count):
            fields = dict(base)
            for name in rng.sample(FIELDS, rng.randint(1, 4)):
                fields[name] = rng.choice(pool)
            spec = ", ".join(f'"{name}": {value}' for name, value in fields.items())
            body = f'{{"spec": {{{spec}}}, "not_before": "{LATER}"}}'
            statuses[_send(client, body)] += 1
            if index % 50 == 49:
                print(f"fuzzed {index + 1}/{count}", file=sys.stderr)
    return statuses


def _send(client: httpx.Client, body: str) -> int | str:
    """The status, after waiting out 429s as told; a dropped connection is counted as a server
    error under its exception's name."""
    for _attempt in range(5):
        try:
            response = client.post(
                "/v1/jobs", content=body, headers={"Content-Type": "application/json"}
            )
        except httpx.TransportError as error:
            print(f"{type(error).__name__} on {body[:300]}", file=sys.stderr)
            return type(error).__name__
        if response.status_code != 429:
            break
        time.sleep(float(response.headers.get("Retry-After", "1")))
    if response.status_code >= 500:
        print(f"{response.status_code} on {body[:300]}", file=sys.stderr)
    return response.status_code


# --- the report --------------------------------------------------------------------------------


def _report(
    rows: list[Row],
    fuzzed: Counter[int | str],
    before: float,
    after: float,
    args: argparse.Namespace,
    database: str,
) -> str:
    lines = [
        f"#### Abuse of a live server ({time.strftime('%Y-%m-%d')}, `bitplan serve`, {database})",
        "",
        "| attack | status | expected | server's message |",
        "|---|---|---|---|",
    ]
    for row in rows:
        mark = "" if row.ok else " **UNEXPECTED**"
        message = row.message.replace("|", "\\|").replace("\n", " ")
        lines.append(f"| {row.attack} | {row.status}{mark} | {row.expected} | {message[:160]} |")
    fuzz_statuses = ", ".join(f"{n} x {status}" for status, n in sorted(fuzzed.items(), key=str))
    server_errors = _server_errors(fuzzed)
    growth = after - before
    lines += [
        "",
        f"Fuzzed specs (seed {args.seed}): {sum(fuzzed.values())} sent, {fuzz_statuses}; "
        f"server errors: {server_errors}.",
        "",
        "| API resident memory before | after | growth | target |",
        "|---|---|---|---|",
        f"| {before:.0f} MB | {after:.0f} MB | {growth:+.0f} MB | <= {args.max_growth_mb:.0f} MB: "
        f"{'PASS' if growth <= args.max_growth_mb else 'FAIL'} |",
        "",
        f"Unexpected statuses: {sum(not row.ok for row in rows)} of {len(rows)} attacks.",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
