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

The attacks and the server they expect are bench/attacks.py, the fuzzed specs
bench/spec_fuzz.py; the server is started by bench/deploy.py, as the end-to-end tests start theirs.

Run: `.venv/bin/python bench/abuse.py [--fuzz 300]`; the tables also go to bench/out/abuse.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import psycopg

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
from bench.attacks import ATTACKS, Row, environment, setup  # noqa: E402
from bench.deploy import resident_mb, server_pid, serving, throwaway_database  # noqa: E402
from bench.spec_fuzz import fuzz  # noqa: E402
from bench.tables import markdown_table  # noqa: E402

OUT = REPO_ROOT / "bench" / "out" / "abuse.md"
POSTGRES_ADMIN_URL = os.environ.get(
    "BITPLAN_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
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
        env = environment(root, db)
        with serving(env, root / "serve.log") as url:
            pid = server_pid(url)
            target = setup(url, env, root)
            before = resident_mb(pid)
            rows = [row for attack in ATTACKS for row in attack(target)]
            fuzzed = fuzz(target, args.fuzz, args.seed)
            after = resident_mb(pid)
    report = _report(rows, fuzzed, before, after, args, "PostgreSQL" if db else "SQLite")
    print(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report + "\n")
    failed = [row for row in rows if not row.ok]
    return 1 if failed or _server_errors(fuzzed) or after - before > args.max_growth_mb else 0


def _server_errors(statuses: Counter[int | str]) -> int:
    """5xx answers and requests the server dropped."""
    return sum(n for status, n in statuses.items() if not isinstance(status, int) or status >= 500)


@contextmanager
def _database() -> Iterator[str | None]:
    """A fresh PostgreSQL database for the run (dropped after), or None for SQLite."""
    with ExitStack() as stack:
        try:
            url = stack.enter_context(throwaway_database(POSTGRES_ADMIN_URL, "bitplan_abuse"))
        except psycopg.OperationalError:
            url = None
        yield url


def _report(
    rows: list[Row],
    fuzzed: Counter[int | str],
    before: float,
    after: float,
    args: argparse.Namespace,
    database: str,
) -> str:
    """The markdown docs/benchmarks.md quotes: one row per attack, the fuzzed statuses, the
    API's memory before and after."""
    attacks = [
        [
            row.attack,
            f"{row.status}{'' if row.ok else ' **UNEXPECTED**'}",
            row.expected,
            row.message.replace("|", "\\|").replace("\n", " ")[:160],
        ]
        for row in rows
    ]
    fuzz_statuses = ", ".join(f"{n} x {status}" for status, n in sorted(fuzzed.items(), key=str))
    growth = after - before
    memory = [
        f"{before:.0f} MB",
        f"{after:.0f} MB",
        f"{growth:+.0f} MB",
        f"<= {args.max_growth_mb:.0f} MB: {'PASS' if growth <= args.max_growth_mb else 'FAIL'}",
    ]
    return "\n".join(
        [
            f"#### Abuse of a live server ({time.strftime('%Y-%m-%d')}, `bitplan serve`, {database})",
            "",
            markdown_table(("attack", "status", "expected", "server's message"), attacks),
            "",
            f"Fuzzed specs (seed {args.seed}): {sum(fuzzed.values())} sent, {fuzz_statuses}; "
            f"server errors: {_server_errors(fuzzed)}.",
            "",
            markdown_table(("API resident memory before", "after", "growth", "target"), [memory]),
            "",
            f"Unexpected statuses: {sum(not row.ok for row in rows)} of {len(rows)} attacks.",
        ]
    )


if __name__ == "__main__":
    sys.exit(main())
