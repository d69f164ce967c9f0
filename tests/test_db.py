"""The db package against real databases: SQLite always, PostgreSQL under `-m integration`.

Every repository test runs on both backends because the two enforce concurrency differently
(row locks with SKIP LOCKED versus one database write lock); the claim and lease tests are the
ones that would let a job run twice or never.
"""

from __future__ import annotations

import hashlib
import io
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from allocator.job import JobStatus, UploadKind
from db import repositories as repo
from db.models import ApiKey, Artifact, Base, Job, ResultRow, utcnow
from db.session import (
    alembic_config,
    database_url,
    default_url,
    init_db,
    make_engine,
    make_session_factory,
    normalize_url,
)
from db.store import CHUNK_SIZE, FolderStore, UnknownObject

T = TypeVar("T")
REPO_ROOT = Path(__file__).resolve().parent.parent
SPEC = {"model": "zoo:resnet20", "budget": "4.5 bits"}
LEASE = 30.0


@pytest.fixture
def sessions(engine: Engine) -> sessionmaker[Session]:
    return make_session_factory(engine)


@pytest.fixture
def session(sessions: sessionmaker[Session]) -> Iterator[Session]:
    with sessions() as session:
        yield session


def in_threads(count: int, work: Callable[[int], T]) -> list[T]:
    """Run `work(i)` in `count` threads released together, to make races likely."""
    barrier = threading.Barrier(count)

    def run(index: int) -> T:
        barrier.wait()
        return work(index)

    with ThreadPoolExecutor(count) as pool:
        return list(pool.map(run, range(count)))


def new_job(session: Session, tenant: str = "acme", **options: Any) -> Job:
    job, _created = repo.create_job(session, tenant=tenant, spec=SPEC, **options)
    return job


def claim(session: Session, now: datetime | None = None, worker: str = "w1") -> Job | None:
    return repo.claim_next_job(session, worker_id=worker, lease_seconds=LEASE, now=now)


def finish(session: Session, job_id: str, artifacts: list[repo.ArtifactRecord]) -> bool:
    return repo.finish_job(
        session,
        job_id=job_id,
        bit_plan={"layers": {"conv1": 8}},
        metrics={"top1": 0.91},
        solver={"status": "Optimal"},
        result={"size_bits": 1234},
        artifacts=artifacts,
        timings={"solve": 0.25},
    )


def artifact(name: str) -> repo.ArtifactRecord:
    sha256 = hashlib.sha256(name.encode()).hexdigest()
    return repo.ArtifactRecord(name, "json", sha256, 10, f"cas://sha256/{sha256}")


# --- session and migrations ----------------------------------------------------------------------


@pytest.mark.slow
def test_migrations_serialise_concurrent_starts_and_match_models(engine: Engine) -> None:
    """Every API and worker process migrates on start; a fleet starting together must not race."""
    command.downgrade(alembic_config(engine), "base")
    url = engine.url.render_as_string(hide_password=False)
    starter = f"from db.session import init_db; init_db({url!r}).dispose()"

    processes = [
        subprocess.Popen([sys.executable, "-c", starter], cwd=REPO_ROOT, stderr=subprocess.PIPE)
        for _ in range(3)
    ]
    errors = [process.communicate(timeout=120)[1].decode() for process in processes]
    in_threads(2, lambda _index: init_db(url).dispose())

    assert [process.returncode for process in processes] == [0, 0, 0], errors
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    with engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        assert context.get_current_revision() == head
        assert compare_metadata(context, Base.metadata) == []


def test_init_db_does_not_depend_on_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    engine = init_db(default_url(tmp_path / "home"))
    with engine.connect() as connection:
        assert connection.execute(select(func.count()).select_from(Job)).scalar_one() == 0
    engine.dispose()
    assert (tmp_path / "home" / "bitplan.db").is_file()


def test_sqlite_connections_use_wal_foreign_keys_and_a_busy_timeout(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'x.db'}")
    with engine.connect() as connection:
        assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert connection.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert connection.exec_driver_sql("PRAGMA busy_timeout").scalar() >= 1000
    engine.dispose()


def test_urls_default_to_sqlite_under_home_and_route_postgres_to_psycopg(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for url in ("postgres://u@h/d", "postgresql://u@h/d"):
        assert normalize_url(url).drivername == "postgresql+psycopg"
    assert normalize_url("sqlite:///x.db").drivername == "sqlite"

    monkeypatch.delenv("BITPLAN_DATABASE_URL", raising=False)
    monkeypatch.setenv("BITPLAN_HOME", str(tmp_path))
    assert database_url() == f"sqlite:///{tmp_path / 'bitplan.db'}"
    monkeypatch.setenv("BITPLAN_DATABASE_URL", "postgresql://u@h/d")
    assert database_url() == "postgresql://u@h/d"


def test_timestamps_come_back_as_utc_and_naive_ones_are_refused(session: Session) -> None:
    job = new_job(session)
    session.expunge_all()

    stored = repo.get_job(session, tenant="acme", job_id=job.id)

    assert stored is not None
    assert stored.created_at.utcoffset() == timedelta(0)
    assert abs(stored.created_at - utcnow()) < timedelta(minutes=1)
    with pytest.raises(Exception, match="naive datetime"):
        new_job(session, not_before=datetime(2030, 1, 1))
    session.rollback()


# --- job creation, reading, pagination -----------------------------------------------------------


def test_idempotency_key_returns_the_first_job_per_tenant(session: Session) -> None:
    first, created = repo.create_job(session, tenant="acme", spec=SPEC, idempotency_key="k1")
    again, created_again = repo.create_job(
        session, tenant="acme", spec=dict(reversed(SPEC.items())), idempotency_key="k1"
    )
    other_tenant, _ = repo.create_job(session, tenant="globex", spec=SPEC, idempotency_key="k1")

    assert created and not created_again
    assert again.id == first.id
    assert other_tenant.id != first.id
    with pytest.raises(repo.IdempotencyConflict, match=first.id):
        repo.create_job(session, tenant="acme", spec={"other": 1}, idempotency_key="k1")


def test_concurrent_requests_with_one_idempotency_key_create_one_job(
    sessions: sessionmaker[Session],
) -> None:
    def submit(_index: int) -> str:
        with sessions() as session:
            job, _ = repo.create_job(session, tenant="acme", spec=SPEC, idempotency_key="race")
            return job.id

    ids = in_threads(4, submit)

    assert len(set(ids)) == 1
    with sessions() as session:
        assert len(repo.list_jobs(session, tenant="acme").jobs) == 1


def test_tenants_never_see_each_others_objects(session: Session) -> None:
    job = new_job(session, tenant="acme")
    claimed = claim(session)
    assert claimed is not None
    assert finish(session, job.id, [artifact("plan.json")])
    upload, _ = repo.add_upload(
        session, tenant="acme", kind=UploadKind.MODEL, sha256="a" * 64, size=1, uri="u"
    )
    key = repo.ProfileKey.of(model_sha256="m", data_sha256="d", method="fisher", options={})
    profile = repo.put_profile(session, tenant="acme", key=key, cost_table={"t": []})

    assert repo.get_job(session, tenant="acme", job_id=job.id) is not None
    assert repo.get_job(session, tenant="globex", job_id=job.id) is None
    assert repo.list_jobs(session, tenant="globex").jobs == []
    assert repo.request_cancel(session, tenant="globex", job_id=job.id) is None
    assert repo.get_result(session, tenant="globex", job_id=job.id) is None
    assert repo.list_artifacts(session, tenant="globex", job_id=job.id) == []
    assert repo.get_artifact(session, tenant="globex", job_id=job.id, name="plan.json") is None
    assert repo.get_upload(session, tenant="globex", upload_id=upload.id) is None
    assert repo.get_profile(session, tenant="globex", key=key) is None
    assert repo.get_profile_by_id(session, tenant="globex", profile_id=profile.id) is None


def test_cursor_pagination_walks_every_job_once_newest_first(session: Session) -> None:
    ids = [new_job(session).id for _ in range(7)]
    tied = utcnow()
    session.execute(update(Job).where(Job.id.in_(ids[2:5])).values(created_at=tied))
    session.commit()
    expected = [
        job.id
        for job in session.scalars(select(Job).order_by(Job.created_at.desc(), Job.id.desc()))
    ]

    seen: list[str] = []
    pages = 0
    cursor: str | None = None
    while True:
        page = repo.list_jobs(session, tenant="acme", limit=3, cursor=cursor)
        seen += [job.id for job in page.jobs]
        pages += 1
        if page.next_cursor is None:
            break
        cursor = page.next_cursor

    assert seen == expected
    assert pages == 3
    with pytest.raises(repo.InvalidCursor):
        repo.list_jobs(session, tenant="acme", cursor="not-a-cursor")


def test_list_jobs_filters_by_status(session: Session) -> None:
    running = new_job(session)
    queued = new_job(session)
    assert claim(session) is not None

    page = repo.list_jobs(session, tenant="acme", status=JobStatus.QUEUED)

    assert [job.id for job in page.jobs] == [queued.id]
    assert running.id not in [job.id for job in page.jobs]


# --- claiming and leases -------------------------------------------------------------------------


def test_concurrent_claims_never_hand_one_job_to_two_workers(
    sessions: sessionmaker[Session],
) -> None:
    with sessions() as session:
        all_ids = {new_job(session).id for _ in range(24)}

    def drain(worker: int) -> list[str]:
        claimed = []
        with sessions() as session:
            while (job := claim(session, worker=f"w{worker}")) is not None:
                assert job.lease_owner == f"w{worker}"
                claimed.append(job.id)
        return claimed

    per_worker = in_threads(4, drain)

    claimed = [job_id for ids in per_worker for job_id in ids]
    assert len(claimed) == len(set(claimed)) == len(all_ids)
    assert set(claimed) == all_ids


def test_claim_job_by_id_succeeds_once(sessions: sessionmaker[Session]) -> None:
    with sessions() as session:
        job_id = new_job(session).id

    def take(worker: int) -> bool:
        with sessions() as session:
            job = repo.claim_job(
                session, job_id=job_id, worker_id=f"w{worker}", lease_seconds=LEASE
            )
            return job is not None

    assert sorted(in_threads(4, take)) == [False, False, False, True]


def test_claim_order_respects_priority_age_not_before_and_queues(session: Session) -> None:
    now = utcnow()
    later = new_job(session, not_before=now + timedelta(hours=8))
    old_batch = new_job(session)
    urgent = new_job(session, priority=10, queue="interactive")
    new_batch = new_job(session)

    def next_id(queues: list[str] | None, at: datetime = now) -> str | None:
        job = repo.claim_next_job(
            session, worker_id="w", lease_seconds=LEASE, queues=queues, now=at
        )
        return None if job is None else job.id

    assert next_id(["batch"]) == old_batch.id
    assert next_id(None) == urgent.id
    assert next_id(["interactive"]) is None
    assert next_id(None) == new_batch.id
    assert next_id(None) is None
    assert next_id(None, at=now + timedelta(hours=9)) == later.id


def test_claim_sets_the_lease_and_counts_the_attempt(session: Session) -> None:
    job = new_job(session)
    now = utcnow()

    claimed = claim(session, now=now, worker="w7")

    assert claimed is not None and claimed.id == job.id
    assert claimed.status == JobStatus.RUNNING
    assert claimed.spec == SPEC
    assert claimed.attempts == 1
    assert claimed.lease_owner == "w7"
    assert claimed.lease_expires_at == now + timedelta(seconds=LEASE)


def test_heartbeat_extends_only_the_owners_lease(session: Session) -> None:
    job = new_job(session)
    start = utcnow()
    assert claim(session, now=start, worker="w1") is not None

    later = start + timedelta(seconds=LEASE * 0.9)
    assert repo.heartbeat(session, job_id=job.id, worker_id="w1", lease_seconds=LEASE, now=later)
    assert not repo.heartbeat(session, job_id=job.id, worker_id="w2", lease_seconds=LEASE)

    sweep = repo.requeue_expired_leases(session, now=start + timedelta(seconds=LEASE * 1.5))
    assert sweep.requeued == []
    stored = repo.get_job(session, tenant="acme", job_id=job.id)
    assert stored is not None and stored.status == JobStatus.RUNNING


def test_expired_leases_requeue_until_attempts_run_out(session: Session) -> None:
    job = new_job(session, max_attempts=3)
    now = utcnow()
    for attempt in (1, 2, 3):
        claimed = claim(session, now=now, worker=f"w{attempt}")
        assert claimed is not None and claimed.attempts == attempt
        now += timedelta(seconds=LEASE + 1)
        sweep = repo.requeue_expired_leases(session, now=now)
        if attempt < 3:
            assert sweep.requeued == [job.id]
            assert not repo.heartbeat(
                session, job_id=job.id, worker_id=f"w{attempt}", lease_seconds=1
            )
        else:
            assert sweep.failed == [job.id]

    stored = repo.get_job(session, tenant="acme", job_id=job.id)
    assert stored is not None
    assert stored.status == JobStatus.FAILED
    assert stored.attempts == 3
    assert stored.finished_at is not None
    assert stored.error is not None and "w3" in stored.error and "attempt 3" in stored.error
    assert claim(session, now=now) is None


def test_retryable_failure_requeues_and_keeps_the_error(session: Session) -> None:
    job = new_job(session, max_attempts=2)
    assert claim(session) is not None

    assert repo.fail_job(session, job_id=job.id, error="redis gone", retryable=True) == "queued"
    assert claim(session) is not None
    assert repo.fail_job(session, job_id=job.id, error="redis gone again", retryable=True) == (
        JobStatus.FAILED
    )
    assert repo.fail_job(session, job_id=job.id, error="late") is None

    stored = repo.get_job(session, tenant="acme", job_id=job.id)
    assert stored is not None and stored.error == "redis gone again"


def test_progress_is_clamped_and_only_recorded_while_running(session: Session) -> None:
    job = new_job(session)
    assert not repo.update_progress(session, job_id=job.id, phase="sensitivity", progress=0.5)
    assert claim(session) is not None

    assert repo.update_progress(session, job_id=job.id, phase="solve", progress=1.0000001)

    stored = repo.get_job(session, tenant="acme", job_id=job.id)
    assert stored is not None and (stored.phase, stored.progress) == ("solve", 1.0)


# --- cancellation --------------------------------------------------------------------------------


def test_cancel_of_a_queued_job_takes_effect_at_once(session: Session) -> None:
    job = new_job(session)

    cancelled = repo.request_cancel(session, tenant="acme", job_id=job.id)

    assert cancelled is not None and cancelled.status == JobStatus.CANCELLED
    assert claim(session) is None


def test_cancel_of_a_running_job_is_a_flag_the_worker_acts_on(session: Session) -> None:
    job = new_job(session)
    assert claim(session) is not None
    assert not repo.is_cancel_requested(session, job_id=job.id)

    flagged = repo.request_cancel(session, tenant="acme", job_id=job.id)

    assert flagged is not None and flagged.status == JobStatus.RUNNING
    assert repo.is_cancel_requested(session, job_id=job.id)
    assert repo.cancel_job(session, job_id=job.id)
    stored = repo.get_job(session, tenant="acme", job_id=job.id)
    assert stored is not None and stored.status == JobStatus.CANCELLED
    assert not finish(session, job.id, [])


def test_a_flagged_job_whose_worker_died_ends_cancelled_not_requeued(session: Session) -> None:
    job = new_job(session)
    now = utcnow()
    assert claim(session, now=now) is not None
    assert repo.request_cancel(session, tenant="acme", job_id=job.id) is not None

    sweep = repo.requeue_expired_leases(session, now=now + timedelta(seconds=LEASE + 1))

    assert sweep.cancelled == [job.id] and sweep.requeued == []


# --- finishing -----------------------------------------------------------------------------------


def test_finish_is_idempotent(session: Session) -> None:
    job = new_job(session)
    assert claim(session) is not None
    artifacts = [artifact("plan.json"), artifact("model.safetensors")]

    assert finish(session, job.id, artifacts)
    assert not finish(session, job.id, artifacts)

    results = session.scalars(select(ResultRow).where(ResultRow.job_id == job.id)).all()
    stored_artifacts = session.scalars(select(Artifact).where(Artifact.job_id == job.id)).all()
    assert len(results) == 1 and len(stored_artifacts) == 2
    stored = repo.get_job(session, tenant="acme", job_id=job.id)
    assert stored is not None
    assert stored.status == JobStatus.SUCCEEDED
    assert stored.progress == 1.0 and stored.timings == {"solve": 0.25}
    result = repo.get_result(session, tenant="acme", job_id=job.id)
    assert result is not None and result.bit_plan == {"layers": {"conv1": 8}}
    found = repo.get_artifact(session, tenant="acme", job_id=job.id, name="plan.json")
    assert found is not None and found.uri == artifacts[0].uri


def test_concurrent_finishes_store_one_result(sessions: sessionmaker[Session]) -> None:
    with sessions() as session:
        job_id = new_job(session).id
        assert claim(session) is not None

    def finish_once(_index: int) -> bool:
        with sessions() as session:
            return finish(session, job_id, [artifact("plan.json")])

    assert sorted(in_threads(4, finish_once)) == [False, False, False, True]
    with sessions() as session:
        count = select(func.count()).select_from(ResultRow).where(ResultRow.job_id == job_id)
        assert session.scalar(count) == 1


def test_finish_writes_all_or_nothing(session: Session) -> None:
    job = new_job(session)
    assert claim(session) is not None

    with pytest.raises(IntegrityError):
        finish(session, job.id, [artifact("same.json"), artifact("same.json")])
    session.rollback()

    stored = repo.get_job(session, tenant="acme", job_id=job.id)
    assert stored is not None and stored.status == JobStatus.RUNNING
    assert repo.get_result(session, tenant="acme", job_id=job.id) is None


# --- api keys, uploads, profiles -----------------------------------------------------------------


def test_api_keys_verify_to_their_tenant_until_revoked(session: Session) -> None:
    key = repo.create_api_key(session, tenant="acme", name="ci")
    other = repo.create_api_key(session, tenant="globex")

    assert repo.verify_api_key(session, key) == "acme"
    assert repo.verify_api_key(session, other) == "globex"
    assert repo.verify_api_key(session, key[:-1] + ("A" if key[-1] != "A" else "B")) is None
    assert repo.verify_api_key(session, "garbage") is None
    stored_hashes = session.scalars(select(ApiKey.key_sha256)).all()
    assert key not in stored_hashes
    assert hashlib.sha256(key.encode()).hexdigest() in stored_hashes

    prefix = key.split("_")[1]
    assert repo.revoke_api_key(session, tenant="globex", prefix=prefix) is False
    assert repo.revoke_api_key(session, tenant="acme", prefix=prefix) is True
    assert repo.verify_api_key(session, key) is None


def test_uploads_dedup_by_tenant_kind_and_sha256(session: Session) -> None:
    def add(tenant: str, kind: UploadKind) -> tuple[str, bool]:
        upload, created = repo.add_upload(
            session, tenant=tenant, kind=kind, sha256="b" * 64, size=3, uri="cas://x", filename="m"
        )
        return upload.id, created

    first_id, created = add("acme", UploadKind.MODEL)
    again_id, created_again = add("acme", UploadKind.MODEL)
    dataset_id, _ = add("acme", UploadKind.DATASET)
    other_id, _ = add("globex", UploadKind.MODEL)

    assert created and not created_again and again_id == first_id
    assert len({first_id, dataset_id, other_id}) == 3
    upload = repo.get_upload(session, tenant="acme", upload_id=first_id)
    assert upload is not None and upload.size == 3 and upload.kind == UploadKind.MODEL


def test_profiles_are_found_by_key_and_the_first_table_is_kept(session: Session) -> None:
    key = repo.ProfileKey.of(
        model_sha256="m" * 64, data_sha256="d" * 64, method="fisher", options={"a": 1, "b": 2}
    )
    same_options = repo.ProfileKey.of(
        model_sha256="m" * 64, data_sha256="d" * 64, method="fisher", options={"b": 2, "a": 1}
    )
    other_method = repo.ProfileKey.of(
        model_sha256="m" * 64, data_sha256="d" * 64, method="lrp", options={"a": 1, "b": 2}
    )

    stored = repo.put_profile(session, tenant="acme", key=key, cost_table={"costs": [1]})
    kept = repo.put_profile(session, tenant="acme", key=same_options, cost_table={"costs": [2]})

    assert kept.id == stored.id and kept.cost_table == {"costs": [1]}
    found = repo.get_profile(session, tenant="acme", key=key)
    assert found is not None and found.id == stored.id
    assert repo.get_profile(session, tenant="acme", key=other_method) is None


# --- artifact store ------------------------------------------------------------------------------


def test_store_is_content_addressed_and_deduplicates(tmp_path: Path) -> None:
    store = FolderStore(tmp_path / "artifacts")
    source = tmp_path / "weights.bin"
    source.write_bytes(b"weights")

    from_file = store.put_file(source)
    from_bytes = store.put_bytes(b"weights")

    sha256 = hashlib.sha256(b"weights").hexdigest()
    assert from_file == from_bytes == (sha256, 7, f"cas://sha256/{sha256}")
    assert store.path(from_file.uri) == tmp_path / "artifacts" / sha256[:2] / sha256
    with store.open(from_file.uri) as handle:
        assert handle.read() == b"weights"
    stored_files = [path for path in (tmp_path / "artifacts").rglob("*") if path.is_file()]
    assert stored_files == [store.path(from_file.uri)]


def test_store_hashes_large_files_in_chunks(tmp_path: Path) -> None:
    data = bytes(range(256)) * (CHUNK_SIZE * 3 // 256 + 7)
    source = tmp_path / "big.bin"
    source.write_bytes(data)

    stored = FolderStore(tmp_path / "artifacts").put_file(source)

    assert stored.sha256 == hashlib.sha256(data).hexdigest()
    assert stored.size == len(data)


def test_store_leaves_nothing_behind_when_a_write_fails(tmp_path: Path) -> None:
    class BrokenUpload(io.RawIOBase):
        def __init__(self) -> None:
            self.reads = 0

        def readable(self) -> bool:
            return True

        def readinto(self, buffer: Any) -> int:
            self.reads += 1
            if self.reads > 2:
                raise ConnectionResetError("client went away")
            buffer[:4] = b"part"
            return 4

    store = FolderStore(tmp_path / "artifacts")

    with pytest.raises(ConnectionResetError):
        store.put_stream(io.BufferedReader(BrokenUpload(), buffer_size=4))

    assert [path for path in (tmp_path / "artifacts").rglob("*") if path.is_file()] == []


def test_concurrent_puts_of_one_content_agree(tmp_path: Path) -> None:
    store = FolderStore(tmp_path / "artifacts")
    data = b"x" * (CHUNK_SIZE + 1)

    uris = in_threads(4, lambda _index: store.put_bytes(data).uri)

    assert len(set(uris)) == 1
    assert store.path(uris[0]).read_bytes() == data


def test_store_refuses_uris_it_did_not_issue(tmp_path: Path) -> None:
    store = FolderStore(tmp_path / "artifacts")
    missing = "cas://sha256/" + "0" * 64

    for uri in (missing, "cas://sha256/../../etc/passwd", "file:///etc/passwd"):
        with pytest.raises(UnknownObject):
            store.path(uri)


def test_store_defaults_to_artifacts_under_bitplan_home(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BITPLAN_HOME", str(tmp_path))

    stored = FolderStore().put_bytes(b"report")

    assert stored.sha256 == hashlib.sha256(b"report").hexdigest()
    assert (tmp_path / "artifacts" / stored.sha256[:2] / stored.sha256).is_file()
