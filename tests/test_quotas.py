"""Quotas and rate limits (issue 10, item 6): what one key, one client address or one tenant can
take from the server, the `bitplan keys list|revoke` commands, and the key /metrics asks for.

Each test builds its own app after setting the limits it exercises, so the defaults every other
test runs under stay untouched. TestClient sends every request from one address, "testclient".
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr
from sqlalchemy import func, select, update
from typer.testing import CliRunner

from db import repositories
from db.models import ApiKey, Upload
from service import quotas
from service.app import create_app
from service.cli import app as cli
from service.settings import Settings
from tests.api_app import LATER, job_body, key_for, npz_bytes, upload


@contextmanager
def serving(settings: Settings, **overrides: Any) -> Iterator[TestClient]:
    """The API over `settings` with `overrides` applied before the app is built."""
    for name, value in overrides.items():
        setattr(settings, name, value)
    with TestClient(create_app(settings)) as client:
        yield client


def _retry_after(response: Any) -> int:
    seconds = int(response.headers["Retry-After"])
    assert seconds >= 1
    return seconds


# --- per-key request rate ------------------------------------------------------------------------


def test_a_key_past_its_burst_is_429_while_another_tenants_key_is_served(
    settings: Settings,
) -> None:
    with serving(settings, rate_limit_per_second=0.5, rate_limit_burst=5) as client:
        acme, globex = key_for(client, "acme"), key_for(client, "globex")
        statuses = [client.get("/v1/jobs", headers=acme).status_code for _ in range(5)]
        assert statuses == [200] * 5
        refused = client.get("/v1/jobs", headers=acme)
        assert refused.status_code == 429
        assert refused.json()["error"] == "RateLimited"
        assert "BITPLAN_RATE_LIMIT_PER_SECOND" in refused.json()["detail"]
        assert _retry_after(refused) <= 2  # one token at 0.5/s
        assert client.get("/v1/jobs", headers=globex).status_code == 200


def test_a_key_is_served_again_once_its_bucket_refills(settings: Settings) -> None:
    with serving(settings, rate_limit_per_second=20.0, rate_limit_burst=2) as client:
        acme = key_for(client, "acme")
        assert [client.get("/v1/jobs", headers=acme).status_code for _ in range(3)][-1] == 429
        time.sleep(0.1)  # two tokens at 20/s
        assert client.get("/v1/jobs", headers=acme).status_code == 200


# --- failed authentications per client address ---------------------------------------------------


def test_bad_keys_from_one_address_are_refused_without_asking_the_database(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After 5 failures the address is throttled: later guesses are 429 and never reach the
    database. A key this process verified before still works from that address (a client
    sharing it with a guesser is not locked out); a key it has not seen waits for the window."""
    with serving(settings, auth_failures_per_minute=5, key_cache_seconds=0) as client:
        acme = key_for(client, "acme")
        assert client.get("/v1/jobs", headers=acme).status_code == 200
        fresh = key_for(client, "globex")
        lookups = _count_key_lookups(monkeypatch)

        statuses = [
            client.get("/v1/jobs", headers={"Authorization": f"Bearer bp_{i:08x}_guess"})
            for i in range(50)
        ]
        assert [response.status_code for response in statuses] == [401] * 5 + [429] * 45
        assert len(lookups) == 5
        assert statuses[-1].json()["error"] == "TooManyFailedAuthentications"
        assert _retry_after(statuses[-1]) <= 60

        assert client.get("/v1/jobs", headers=acme).status_code == 200
        assert client.get("/v1/jobs", headers=fresh).status_code == 429
        assert len(lookups) == 6  # acme's lookup; the fresh key's was refused before it


def test_a_throttled_address_is_served_again_once_the_window_passes(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(quotas, "WINDOW_SECONDS", 0.5)
    with serving(settings, auth_failures_per_minute=2) as client:
        acme = key_for(client, "acme")
        bad = {"Authorization": "Bearer bp_00000000_guess"}
        statuses = [client.get("/v1/jobs", headers=bad).status_code for _ in range(3)]
        assert statuses == [401, 401, 429]
        assert client.get("/v1/jobs", headers=acme).status_code == 429
        time.sleep(0.6)
        assert client.get("/v1/jobs", headers=acme).status_code == 200
        assert client.get("/v1/jobs", headers=bad).status_code == 401


def test_failures_from_many_addresses_are_kept_in_bounded_memory() -> None:
    failures = quotas.FailedAuthentications(per_minute=1, size=100)
    for address in range(10_000):
        key = f"bp_{address:08x}_key"
        failures.succeeded(key)
        failures.failed(f"10.0.{address // 256}.{address % 256}", key)
        failures.succeeded(key)
    assert len(failures._windows) == 100
    assert len(failures._verified) == 100


def _count_key_lookups(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The keys `verify_api_key` is asked about from now on."""
    lookups: list[str] = []
    verify = repositories.verify_api_key

    def counted(session: Any, key: str) -> str | None:
        lookups.append(key)
        return verify(session, key)

    monkeypatch.setattr(repositories, "verify_api_key", counted)
    return lookups


# --- per-tenant quotas ---------------------------------------------------------------------------


def test_the_active_jobs_quota_refuses_jobs_and_whole_sweeps_and_stores_nothing(
    settings: Settings,
) -> None:
    with serving(settings, max_active_jobs_per_tenant=2) as client:
        acme, globex = key_for(client, "acme"), key_for(client, "globex")
        calib = _calib(client, acme)
        for _ in range(2):
            assert client.post("/v1/jobs", headers=acme, json=job_body(calib)).status_code == 202
        refused = client.post("/v1/jobs", headers=acme, json=job_body(calib))
        assert refused.status_code == 429
        assert refused.json()["error"] == "ActiveJobsQuotaExceeded"
        assert "2 queued or running jobs of the 2 allowed" in refused.json()["detail"]
        _retry_after(refused)
        assert len(_jobs(client, acme)) == 2

        other = client.post("/v1/jobs", headers=globex, json=job_body(_calib(client, globex)))
        assert other.status_code == 202

        first = _jobs(client, acme)[0]["id"]
        assert client.post(f"/v1/jobs/{first}/cancel", headers=acme).status_code == 202  # 1 left
        sweep = {
            "spec": {"model": "zoo:cifar_resnet20", "calib": calib},
            "budgets": ["avg-bits=3", "avg-bits=4"],
            "not_before": LATER,
        }
        too_many = client.post("/v1/sweeps", headers=acme, json=sweep)
        assert too_many.status_code == 429
        assert "this request adds 2" in too_many.json()["detail"]
        assert len(_jobs(client, acme)) == 2
        fits = client.post("/v1/sweeps", headers=acme, json={**sweep, "budgets": ["avg-bits=3"]})
        assert fits.status_code == 202, fits.text
        assert len(_jobs(client, acme)) == 3


def test_the_stored_bytes_quota_refuses_uploads_that_would_pass_it(settings: Settings) -> None:
    first, second = npz_bytes(4), npz_bytes(8)
    with serving(settings, max_stored_bytes_per_tenant=len(first) + len(second) // 2) as client:
        acme, globex = key_for(client, "acme"), key_for(client, "globex")
        assert upload(client, acme, "datasets", "a.npz", first).status_code == 201
        refused = upload(client, acme, "datasets", "b.npz", second)
        assert refused.status_code == 413
        assert refused.json()["error"] == "StoredBytesQuotaExceeded"
        assert f"stores {len(first):,} bytes" in refused.json()["detail"]
        assert _stored(client, "acme") == (1, len(first))

        settings.max_stored_bytes_per_tenant = len(first)  # read per request: now at the quota
        assert upload(client, acme, "datasets", "c.npz", npz_bytes(1)).status_code == 413
        assert _stored(client, "acme") == (1, len(first))
        assert upload(client, globex, "datasets", "a.npz", first).status_code == 413
        settings.max_stored_bytes_per_tenant = 10 * len(second)
        assert upload(client, globex, "datasets", "b.npz", second).status_code == 201


def test_stored_bytes_count_the_tenants_uploads_and_its_jobs_artifacts(
    client: TestClient,
) -> None:
    with client.app.state.session_factory() as session:
        repositories.add_upload(
            session, tenant="acme", kind="model", sha256="a" * 64, size=100, uri="u"
        )
        job, _ = repositories.create_job(session, tenant="acme", spec={})
        repositories.create_job(session, tenant="globex", spec={})
        assert repositories.claim_job(session, job_id=job.id, worker_id="w", lease_seconds=60)
        artifact = repositories.ArtifactRecord("model", "packed", "b" * 64, 1000, "a")
        repositories.finish_job(
            session,
            job_id=job.id,
            bit_plan={},
            metrics={},
            solver={},
            result={},
            artifacts=[artifact],
        )
        assert repositories.stored_bytes(session, tenant="acme") == 1100
        assert repositories.stored_bytes(session, tenant="globex") == 0
        assert repositories.count_active_jobs(session, tenant="acme") == 0
        assert repositories.count_active_jobs(session, tenant="globex") == 1


def _calib(client: TestClient, headers: dict[str, str]) -> str:
    response = upload(client, headers, "datasets", "calib.npz", npz_bytes())
    assert response.status_code == 201, response.text
    return response.json()["ref"]


def _jobs(client: TestClient, headers: dict[str, str]) -> list[dict[str, Any]]:
    return client.get("/v1/jobs", headers=headers).json()["jobs"]


def _stored(client: TestClient, tenant: str) -> tuple[int, int]:
    """(upload rows, stored bytes) of the tenant, read from the database."""
    with client.app.state.session_factory() as session:
        rows = session.scalar(select(func.count()).where(Upload.tenant == tenant))
        return rows, repositories.stored_bytes(session, tenant=tenant)


# --- bitplan keys list | revoke ------------------------------------------------------------------


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The `BITPLAN_HOME` the CLI's keys commands act on (its SQLite database)."""
    monkeypatch.setenv("BITPLAN_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("BITPLAN_DATABASE_URL", raising=False)
    return tmp_path / "home"


def test_keys_list_shows_prefixes_and_revoke_makes_the_key_fail(home: Path) -> None:
    runner = CliRunner()
    created = runner.invoke(cli, ["keys", "create", "--tenant", "acme", "--name", "ci"])
    assert created.exit_code == 0, created.output
    key = created.stdout.strip()
    prefix = key.split("_")[1]

    listed = runner.invoke(cli, ["keys", "list", "--tenant", "acme"])
    assert listed.exit_code == 0, listed.output
    assert prefix in listed.stdout and "ci" in listed.stdout
    assert key not in listed.stdout and key.split("_")[2] not in listed.stdout
    assert runner.invoke(cli, ["keys", "list", "--tenant", "globex"]).stdout.count("\n") == 1

    settings = Settings(home=home, key_cache_seconds=0)
    with TestClient(create_app(settings)) as client:
        headers = {"Authorization": f"Bearer {key}"}
        assert client.get("/v1/jobs", headers=headers).status_code == 200
        revoked = runner.invoke(cli, ["keys", "revoke", prefix])
        assert revoked.exit_code == 0, revoked.output
        assert client.get("/v1/jobs", headers=headers).status_code == 401
    row = runner.invoke(cli, ["keys", "list"]).stdout.splitlines()[1]
    assert row.startswith(prefix) and row.endswith("UTC")  # the revoked column is filled

    again = runner.invoke(cli, ["keys", "revoke", prefix])
    assert again.exit_code == 2
    assert "no active key with prefix" in again.stderr
    unknown = runner.invoke(cli, ["keys", "revoke", "ffffffff", "--tenant", "acme"])
    assert unknown.exit_code == 2
    assert len(unknown.stderr.strip().splitlines()) == 1


def test_keys_revoke_asks_for_the_tenant_when_two_tenants_share_a_prefix(home: Path) -> None:
    runner = CliRunner()
    for tenant in ("acme", "globex"):
        assert runner.invoke(cli, ["keys", "create", "--tenant", tenant]).exit_code == 0
    app = create_app(Settings(home=home))
    with TestClient(app), app.state.session_factory() as session:
        session.execute(update(ApiKey).values(prefix="0badcafe"))  # as if both had drawn it
        session.commit()
    ambiguous = runner.invoke(cli, ["keys", "revoke", "0badcafe"])
    assert ambiguous.exit_code == 2
    assert "pass --tenant" in ambiguous.stderr
    assert runner.invoke(cli, ["keys", "revoke", "0badcafe", "--tenant", "globex"]).exit_code == 0
    listed = runner.invoke(cli, ["keys", "list"]).stdout.splitlines()[1:]
    assert [line.split()[1] for line in listed if line.endswith("-")] == ["acme"]


# --- /metrics ------------------------------------------------------------------------------------


def test_metrics_need_a_valid_api_key(client: TestClient, acme: dict[str, str]) -> None:
    assert client.get("/metrics").status_code == 401
    assert client.get("/metrics", headers={"Authorization": "Bearer bp_0_x"}).status_code == 401
    assert client.get("/metrics", headers=acme).status_code == 200
    assert client.get("/healthz").status_code == 200
    assert client.get("/readyz").status_code == 200


def test_a_metrics_token_replaces_api_keys_for_metrics(settings: Settings) -> None:
    with serving(settings, metrics_token=SecretStr("scrape-me")) as client:
        acme = key_for(client, "acme")
        assert (
            client.get("/metrics", headers={"Authorization": "Bearer scrape-me"}).status_code == 200
        )
        assert client.get("/metrics", headers=acme).status_code == 401
        assert client.get("/metrics").status_code == 401
        assert client.get("/v1/jobs", headers=acme).status_code == 200
