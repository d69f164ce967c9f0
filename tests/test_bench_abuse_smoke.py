"""`bench/abuse.py` against a live server, with a short fuzz: every attack of issue 10 refused
with the expected status, no server error, and the bench's own pass/fail holds.

Starts `bitplan serve` (about 10 s), so it is an integration test; on PostgreSQL when one is
reachable, as CI has.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.integration
def test_every_attack_is_refused_and_nothing_answers_5xx(tmp_path: Path) -> None:
    done = subprocess.run(
        [
            sys.executable,
            str(REPO_ROOT / "bench" / "abuse.py"),
            "--fuzz",
            "40",
            "--out",
            str(tmp_path / "abuse.md"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
        cwd=tmp_path,
    )
    assert "Unexpected statuses: 0 of" in done.stdout, done.stdout + done.stderr
    assert "server errors: 0." in done.stdout
    assert done.returncode == 0, done.stdout + done.stderr
