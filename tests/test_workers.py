"""The job-running mechanics on SQLite and the inline executor: fast, no broker, no model.

What is under test is what keeps a job from running twice, never, or forever: the claim, the
heartbeat, the cancel flag, the retry bound, and the executor's claim order and shutdown. The
pipeline is replaced by a scripted stand-in here (and only here) so these properties can be
driven deterministically in milliseconds; `test_workers_integration.py` runs the real pipeline
on a real Celery worker.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from allocator.errors import BadBudget, BadDataset
from allocator.job import PHASES, JobSpec, JobStatus, Progress, Result
from allocator.job_metrics import JobMetrics
from allocator.plan import BitPlan, LayerPlan
from allocator.zoo import known_prefixes
from db import repositories as repo
from db.models import Artifact, Job, ResultRow, utcnow
from db.session import init_db, make_session_factory
from db.store import ArtifactStore, FolderStore
from workers.executor import CeleryExecutor, InlineExecutor, make_executor
from workers.runner import JobRunner, overall_progress, run_job
from workers.settings import ExecutorKind, WorkerSettings

TENANT = "tenant-a"
# The stand-in never reads the calibration file, but recording a result hashes it (the cached
# profile is keyed by the data's bytes), so it names a file that exists: this one.
SPEC = {"model": "zoo:cifar_resnet20", "calib": __file__, "budget": "avg-bits=4"}
WORKER = "host:1:test"
FAST = WorkerSettings(
    lease_seconds=3.0,
    sweep_seconds=0.1,
    poll_seconds=0.05,
    allowed_input_roots=(Path(__file__).parent,),
)

PhaseAction = Callable[[Progress], None]


class ScriptedPipeline:
    """Walks through the real phase names calling `progress`, runs `actions[phase]` inside a
    phase, and returns a small real `Result` with one artifact file."""

    def __init__(self, actions: dict[str, PhaseAction] | None = None) -> None:
        self.actions = actions or {}
        self.calls: list[str] = []
        self.entered = {phase: threading.Event() for phase in PHASES}

    def __call__(self, spec: JobSpec, progress: Progress, workdir: Path) -> Result:
        self.calls.append(spec.model)
        for phase in PHASES:
            progress(phase, 0.0, "started")
            self.entered[phase].set()
            action = self.actions.get(phase)
            if action is not None:
                action(lambda fraction, message, phase=phase: progress(phase, fraction, message))
            progress(phase, 1.0, "done")
        workdir.mkdir(parents=True, exist_ok=True)
        plan_path = workdir / "bitplan.json"
        plan_path.write_text(f'{{"model": "{spec.model}"}}')
        return Result(
            spec=spec,
            allocation=[{"layer": "fc", "weight_bits": 4, "params": 10}],
            avg_weight_bits=4.0,
            weight_bytes=5.0,
            solver={"status": "optimal"},
            metrics=JobMetrics(primary="top1", fp32={}, quantized={}),
            timings={"load": 0.0},
            plan=BitPlan(layers={"fc": LayerPlan(weight_bits=4)}),
            profile={"method": spec.method},
            artifacts={"bitplan": str(plan_path)},
        )


def raises(error: Exception) -> PhaseAction:
    def action(_progress: Progress) -> None:
        raise error

    return action


def keeps_reporting(seconds: float) -> PhaseAction:
    """A long loop over layers that reports after each one, as the sensitivity phase does."""

    def action(progress: Progress) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            progress(0.5, "layer")
            time.sleep(0.01)

    return action


def stays_silent(seconds: float) -> PhaseAction:
    """A long step that never calls back (a solver run)."""
    return lambda _progress: time.sleep(seconds)


@pytest.fixture
def sessions(tmp_path: Path) -> Iterator[sessionmaker[Session]]:
    engine = init_db(f"sqlite:///{tmp_path / 'bitplan.db'}")
    yield make_session_factory(engine)
    engine.dispose()


@pytest.fixture
def store(tmp_path: Path) -> ArtifactStore:
    return FolderStore(tmp_path / "artifacts")


def submit(sessions: sessionmaker[Session], **options: Any) -> str:
    spec = {**SPEC, **options.pop("spec", {})}
    with sessions() as session:
        job, _ = repo.create_job(session, tenant=TENANT, spec=spec, **options)
    return job.id


def load(sessions: sessionmaker[Session], job_id: str) -> Job:
    with sessions() as session:
        job = repo.get_job(session, tenant=TENANT, job_id=job_id)
    assert job is not None
    return job


def runner(
    sessions: sessionmaker[Session],
    store: ArtifactStore,
    pipeline: ScriptedPipeline,
    **options: Any,
) -> JobRunner:
    return JobRunner(WORKER, sessions, store, pipeline=pipeline, **options)


def wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


# --- the runner ----------------------------------------------------------------------------------


def test_success_records_result_and_artifacts(
    sessions: sessionmaker[Session], store: ArtifactStore
) -> None:
    job_id = submit(sessions)
    pipeline = ScriptedPipeline()

    assert runner(sessions, store, pipeline).run(job_id) is JobStatus.SUCCEEDED

    job = load(sessions, job_id)
    assert (job.progress, job.phase, job.lease_owner, job.attempts) == (1.0, "pack", None, 1)
    with sessions() as session:
        assert session.scalar(select(ResultRow.job_id)) == job_id
        artifact = session.scalars(select(Artifact)).one()
    assert store.path(artifact.uri).read_text() == '{"model": "zoo:cifar_resnet20"}'


def test_a_redelivered_message_runs_nothing(
    sessions: sessionmaker[Session], store: ArtifactStore
) -> None:
    done, taken = submit(sessions), submit(sessions)
    pipeline = ScriptedPipeline()
    runner(sessions, store, pipeline).run(done)
    with sessions() as session:
        repo.claim_job(session, job_id=taken, worker_id="other", lease_seconds=60)

    assert runner(sessions, store, pipeline).run(done) is JobStatus.SUCCEEDED
    assert runner(sessions, store, pipeline).run(taken) is JobStatus.RUNNING
    assert run_job("no-such-job", WORKER, sessions, store) is None
    assert len(pipeline.calls) == 1
    assert load(sessions, taken).lease_owner == "other"
    with sessions() as session:
        assert session.scalar(select(func.count()).select_from(ResultRow)) == 1


def test_a_users_error_fails_at_once_with_its_message(
    sessions: sessionmaker[Session], store: ArtifactStore
) -> None:
    job_id = submit(sessions, max_attempts=3)
    pipeline = ScriptedPipeline({"layers": raises(BadBudget("avg-bits=1 is below 2 bits"))})

    assert runner(sessions, store, pipeline).run(job_id) is JobStatus.FAILED

    job = load(sessions, job_id)
    assert (job.attempts, job.error) == (1, "avg-bits=1 is below 2 bits")


def test_a_failure_declared_permanent_is_not_retried(
    sessions: sessionmaker[Session], store: ArtifactStore
) -> None:
    job_id = submit(sessions, max_attempts=3)
    pipeline = ScriptedPipeline({"sensitivity": raises(TimeoutError())})
    limit = {TimeoutError: "the job ran past its time limit"}

    assert runner(sessions, store, pipeline, permanent_errors=limit).run(job_id) is JobStatus.FAILED
    assert load(sessions, job_id).error == "the job ran past its time limit"


def test_a_spec_the_pipeline_cannot_read_fails_at_once(
    sessions: sessionmaker[Session], store: ArtifactStore
) -> None:
    job_id = submit(sessions, spec={"colour": "blue"})
    pipeline = ScriptedPipeline()

    assert runner(sessions, store, pipeline).run(job_id) is JobStatus.FAILED
    assert "invalid job spec" in (load(sessions, job_id).error or "")
    assert pipeline.calls == []


def test_crashes_retry_until_max_attempts_and_keep_the_last_error(
    sessions: sessionmaker[Session], store: ArtifactStore
) -> None:
    job_id = submit(sessions, max_attempts=3)
    pipeline = ScriptedPipeline({"statistics": raises(RuntimeError("out of memory"))})
    run = runner(sessions, store, pipeline).run

    statuses = [run(job_id) for _ in range(4)]

    assert statuses == [JobStatus.QUEUED, JobStatus.QUEUED, JobStatus.FAILED, JobStatus.FAILED]
    job = load(sessions, job_id)
    assert (job.attempts, job.error) == (3, "RuntimeError: out of memory")
    assert len(pipeline.calls) == 3


def running_in_sensitivity(
    sessions: sessionmaker[Session], store: ArtifactStore
) -> tuple[str, threading.Thread, list[JobStatus | None]]:
    """A job whose runner thread is inside a long sensitivity phase; `outcome` gets its status."""
    job_id = submit(sessions)
    pipeline = ScriptedPipeline({"sensitivity": keeps_reporting(10.0)})
    outcome: list[JobStatus | None] = []
    thread = threading.Thread(
        target=lambda: outcome.append(runner(sessions, store, pipeline).run(job_id))
    )
    thread.start()
    assert pipeline.entered["sensitivity"].wait(10)
    return job_id, thread, outcome


def test_cancel_stops_the_job_in_the_phase_it_was_asked_in(
    sessions: sessionmaker[Session], store: ArtifactStore
) -> None:
    job_id, thread, outcome = running_in_sensitivity(sessions, store)

    asked = time.monotonic()
    with sessions() as session:
        repo.request_cancel(session, tenant=TENANT, job_id=job_id)
    thread.join(10)

    assert outcome == [JobStatus.CANCELLED]
    assert time.monotonic() - asked < 3
    assert load(sessions, job_id).phase == "sensitivity"


def test_cancel_between_phases_stops_before_the_next(
    sessions: sessionmaker[Session], store: ArtifactStore
) -> None:
    job_id = submit(sessions)

    def cancel(_progress: Progress) -> None:
        with sessions() as session:
            repo.request_cancel(session, tenant=TENANT, job_id=job_id)

    pipeline = ScriptedPipeline({"solve": cancel})

    assert runner(sessions, store, pipeline).run(job_id) is JobStatus.CANCELLED
    assert not pipeline.entered["quantize"].is_set()


def test_heartbeats_keep_the_lease_through_a_silent_phase(
    sessions: sessionmaker[Session], store: ArtifactStore
) -> None:
    job_id = submit(sessions)
    pipeline = ScriptedPipeline({"solve": stays_silent(1.5)})
    outcome: list[JobStatus | None] = []
    thread = threading.Thread(
        target=lambda: outcome.append(
            runner(sessions, store, pipeline, lease_seconds=0.6).run(job_id)
        )
    )
    thread.start()
    assert pipeline.entered["solve"].wait(10)
    time.sleep(1.0)  # past the lease a claim alone would have given

    with sessions() as session:
        swept = repo.requeue_expired_leases(session)
    thread.join(10)

    assert swept.requeued == []
    assert outcome == [JobStatus.SUCCEEDED]


def test_a_worker_that_lost_its_lease_stops_and_records_nothing(
    sessions: sessionmaker[Session], store: ArtifactStore
) -> None:
    job_id, thread, outcome = running_in_sensitivity(sessions, store)

    with sessions() as session:  # as a sweeper would, had this worker stalled past its lease
        swept = repo.requeue_expired_leases(session, now=utcnow() + timedelta(hours=1))
    thread.join(10)

    assert swept.requeued == [job_id]
    assert outcome == [JobStatus.QUEUED]
    job = load(sessions, job_id)
    assert (job.status, job.attempts, job.lease_owner) == (JobStatus.QUEUED, 1, None)
    with sessions() as session:
        assert session.scalar(select(func.count()).select_from(ResultRow)) == 0


def test_every_recorded_ending_reaches_the_hook_and_nothing_else(
    sessions: sessionmaker[Session], store: ArtifactStore
) -> None:
    succeeded, failed, retried = submit(sessions), submit(sessions), submit(sessions)
    cancelled, gave_up = submit(sessions), submit(sessions, max_attempts=1)
    ended: list[str] = []
    with sessions() as session:
        repo.request_cancel(session, tenant=TENANT, job_id=cancelled)  # ended, but by the API
        repo.claim_job(session, job_id=gave_up, worker_id="dead", lease_seconds=0.0)

    def hook(job_id: str) -> None:
        ended.append(job_id)
        raise RuntimeError("a receiver that is down must not fail the job")

    for job_id, action in (
        (succeeded, None),
        (failed, raises(BadBudget("no"))),
        (retried, raises(OSError("disk full"))),
    ):
        pipeline = ScriptedPipeline({"load": action} if action else {})
        runner(sessions, store, pipeline, on_ended=hook).run(job_id)
    InlineExecutor(FAST, sessions, store, pipeline=ScriptedPipeline(), on_ended=hook).sweep()

    assert ended == [succeeded, failed, gave_up]
    assert load(sessions, succeeded).status is JobStatus.SUCCEEDED
    assert load(sessions, gave_up).status is JobStatus.FAILED


def test_overall_progress_counts_each_phase_as_an_equal_step() -> None:
    assert overall_progress(PHASES[0], 0.0) == 0.0
    assert overall_progress(PHASES[1], 0.5) == pytest.approx(1.5 / len(PHASES))
    assert overall_progress(PHASES[-1], 1.0) == 1.0
    assert overall_progress("unheard-of", 0.25) == 0.25


# --- the inline executor -------------------------------------------------------------------------


@pytest.fixture
def inline(
    sessions: sessionmaker[Session], store: ArtifactStore
) -> Iterator[Callable[[ScriptedPipeline], InlineExecutor]]:
    started: list[InlineExecutor] = []
    known_prefixes()  # the workers' path check imports the model sources: not inside a timed test

    def start(pipeline: ScriptedPipeline) -> InlineExecutor:
        executor = InlineExecutor(FAST, sessions, store, pipeline=pipeline)
        executor.start()
        started.append(executor)
        return executor

    yield start
    for executor in started:
        executor.stop(timeout=10)


def ended(sessions: sessionmaker[Session], *job_ids: str) -> Callable[[], bool]:
    return lambda: all(load(sessions, job_id).status is JobStatus.SUCCEEDED for job_id in job_ids)


def test_inline_runs_by_priority_and_waits_for_not_before(
    sessions: sessionmaker[Session], inline: Callable[[ScriptedPipeline], InlineExecutor]
) -> None:
    not_before = utcnow() + timedelta(seconds=1)
    later = submit(sessions, spec={"model": "zoo:later"}, priority=9, not_before=not_before)
    low = submit(sessions, spec={"model": "zoo:low"}, priority=0)
    high = submit(sessions, spec={"model": "zoo:high"}, priority=5, queue="interactive")
    pipeline = ScriptedPipeline()

    inline(pipeline)
    wait_for(ended(sessions, later, low, high))

    assert pipeline.calls == ["zoo:high", "zoo:low", "zoo:later"]
    started_at = load(sessions, later).started_at
    assert started_at is not None and started_at >= not_before


def test_inline_dispatch_wakes_an_idle_worker(
    sessions: sessionmaker[Session], store: ArtifactStore
) -> None:
    executor = InlineExecutor(
        replace(FAST, poll_seconds=60.0, sweep_seconds=60.0),
        sessions,
        store,
        pipeline=ScriptedPipeline(),
    )
    executor.start()
    try:
        time.sleep(0.2)  # the thread found nothing and now waits a whole poll interval
        job_id = submit(sessions)
        executor.dispatch(load(sessions, job_id))
        wait_for(ended(sessions, job_id), timeout=5)
    finally:
        executor.stop(timeout=10)


def test_inline_recovers_the_job_of_a_worker_that_died(
    sessions: sessionmaker[Session], inline: Callable[[ScriptedPipeline], InlineExecutor]
) -> None:
    job_id = submit(sessions)
    with sessions() as session:  # claimed by a worker that never heartbeats again
        repo.claim_job(session, job_id=job_id, worker_id="dead", lease_seconds=0.2)

    inline(ScriptedPipeline())
    wait_for(ended(sessions, job_id))

    job = load(sessions, job_id)
    assert job.attempts == 2
    assert job.error is None


def test_inline_stop_hands_a_running_job_back_uncharged(
    sessions: sessionmaker[Session], store: ArtifactStore
) -> None:
    job_id = submit(sessions)
    pipeline = ScriptedPipeline({"sensitivity": keeps_reporting(30.0)})
    executor = InlineExecutor(FAST, sessions, store, pipeline=pipeline)
    executor.start()
    assert pipeline.entered["sensitivity"].wait(10)

    executor.stop(timeout=10)

    job = load(sessions, job_id)
    assert (job.status, job.attempts, job.lease_owner) == (JobStatus.QUEUED, 0, None)


def test_make_executor_follows_the_setting(
    sessions: sessionmaker[Session], store: ArtifactStore
) -> None:
    celery = WorkerSettings.from_env(
        {"BITPLAN_EXECUTOR": "celery", "BITPLAN_BROKER_URL": "redis://127.0.0.1:1/0"}
    )
    assert isinstance(make_executor(celery, sessions, store), CeleryExecutor)
    assert isinstance(make_executor(WorkerSettings.from_env({}), sessions, store), InlineExecutor)
    assert WorkerSettings.from_env({}).executor is ExecutorKind.INLINE


def test_an_unreachable_broker_leaves_the_job_for_a_later_sweep(
    sessions: sessionmaker[Session],
) -> None:
    """The API commits, then dispatches: a broker that is down must neither fail the request
    nor hold it, and the job must stay marked as unsent."""
    settings = WorkerSettings(executor=ExecutorKind.CELERY, broker_url="redis://127.0.0.1:1/0")
    executor = CeleryExecutor(settings, sessions)
    job_id = submit(sessions)
    with sessions() as session:  # a worker that died, for the sweep to requeue
        dead = submit(sessions)
        repo.claim_job(session, job_id=dead, worker_id="dead", lease_seconds=0.0)

    started = time.monotonic()
    executor.dispatch(load(sessions, job_id))
    executor.sweep()

    assert time.monotonic() - started < 10
    assert load(sessions, job_id).dispatched_attempt is None
    assert load(sessions, dead).status is JobStatus.QUEUED
    assert pending(sessions) == [job_id, dead]


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("BITPLAN_EXECUTOR", "threads"),
        ("BITPLAN_LEASE_SECONDS", "0"),
        ("BITPLAN_INLINE_WORKERS", "x"),
    ],
)
def test_a_bad_setting_names_the_variable(name: str, value: str) -> None:
    with pytest.raises(ValueError, match=name):
        WorkerSettings.from_env({name: value})


# --- which queued jobs need a broker message ----------------------------------------------------


def pending(sessions: sessionmaker[Session], **options: Any) -> list[str]:
    with sessions() as session:
        return [
            job.id
            for job in repo.jobs_to_dispatch(session, queues=("interactive", "batch"), **options)
        ]


def test_dispatch_marker_follows_attempts(sessions: sessionmaker[Session]) -> None:
    job_id = submit(sessions)
    future = submit(sessions, not_before=utcnow() + timedelta(hours=8))
    elsewhere = submit(sessions, queue="gpu")
    assert pending(sessions) == [job_id]

    with sessions() as session:
        [job] = repo.jobs_to_dispatch(session, queues=("batch",))
        repo.mark_dispatched(session, sent=[job])
    assert pending(sessions) == []
    assert pending(sessions, include_dispatched=True) == [job_id]

    with sessions() as session:  # taken, then its worker died: the message was used up
        repo.claim_job(session, job_id=job_id, worker_id="dead", lease_seconds=0.0)
        repo.requeue_expired_leases(session, now=utcnow() + timedelta(seconds=1))
    assert pending(sessions) == [job_id]
    assert elsewhere not in pending(sessions, now=utcnow() + timedelta(days=1))
    assert future in pending(sessions, now=utcnow() + timedelta(days=1))


def test_a_stale_mark_does_not_hide_a_requeued_job(sessions: sessionmaker[Session]) -> None:
    """The sweeper read the job, a worker took it and lost it, then the send was recorded."""
    job_id = submit(sessions)
    with sessions() as session:
        [read] = repo.jobs_to_dispatch(session, queues=("batch",))
        repo.claim_job(session, job_id=job_id, worker_id="dead", lease_seconds=0.0)
        repo.requeue_expired_leases(session, now=utcnow() + timedelta(seconds=1))
        repo.mark_dispatched(session, sent=[read])
    assert pending(sessions) == [job_id]


# --- jobs end: time limits, paths a worker opens -------------------------------------------------


def test_a_job_past_its_time_limit_stops_at_its_next_progress_call(
    sessions: sessionmaker[Session], store: ArtifactStore
) -> None:
    job_id = submit(sessions)
    pipeline = ScriptedPipeline({"sensitivity": keeps_reporting(30.0)})
    status = runner(sessions, store, pipeline, time_limit=0.5).run(job_id)

    job = load(sessions, job_id)
    assert status is JobStatus.FAILED
    assert (job.status, job.attempts) == (JobStatus.FAILED, 1)
    assert "time limit of 0.5 s" in job.error
    assert "BITPLAN_JOB_TIME_LIMIT" in job.error


def test_a_hanging_job_is_failed_and_the_inline_worker_takes_the_next_one(
    sessions: sessionmaker[Session], store: ArtifactStore
) -> None:
    """A call that never returns cannot be interrupted in a thread: the watchdog records the job
    as failed, stops renewing its lease, and a fresh thread runs the queue on."""
    release = threading.Event()
    hanging = ScriptedPipeline({"load": lambda _progress: release.wait(60)})
    settings = replace(FAST, job_time_limit=1.0, lease_seconds=30.0)
    executor = InlineExecutor(settings, sessions, store, pipeline=hanging)
    hung = submit(sessions, priority=10)
    executor.start()
    try:
        assert hanging.entered["load"].wait(10)
        wait_for(lambda: load(sessions, hung).status is JobStatus.FAILED, timeout=10)
        assert "time limit" in load(sessions, hung).error
        hanging.actions.clear()  # the next job runs through
        after = submit(sessions)
        executor.dispatch(load(sessions, after))
        wait_for(ended(sessions, after), timeout=10)
    finally:
        release.set()
        executor.stop(timeout=10)
    assert load(sessions, hung).status is JobStatus.FAILED  # the late return changed nothing


def test_the_heartbeat_stops_renewing_past_the_deadline(
    sessions: sessionmaker[Session], store: ArtifactStore
) -> None:
    job_id = submit(sessions)
    pipeline = ScriptedPipeline({"solve": stays_silent(2.5)})
    status = runner(sessions, store, pipeline, lease_seconds=0.6, time_limit=0.3).run(job_id)
    assert status is JobStatus.FAILED  # the lease ran out: it was not renewed past 0.3 s
    with sessions() as session:
        swept = repo.requeue_expired_leases(session)
    assert job_id not in swept.requeued


def test_a_worker_refuses_server_paths_outside_its_allowed_roots(
    sessions: sessionmaker[Session], store: ArtifactStore, tmp_path: Path
) -> None:
    """The API checks paths at submit on its own disk; the worker checks again where it opens
    them, including an `hf:` folder the API never saw."""
    outside = tmp_path / "secret.npz"
    outside.write_bytes(b"x")
    link = Path(__file__).parent / "link-to-outside.npz"
    for spec in (
        {"calib": str(outside)},
        {"calib": str(Path(__file__).parent / ".." / ".." / "etc" / "hostname")},
        {"model": f"hf:{tmp_path}"},
    ):
        job_id = submit(sessions, spec=spec)
        pipeline = ScriptedPipeline()
        assert (
            runner(sessions, store, pipeline, allowed_roots=FAST.allowed_input_roots).run(job_id)
            is JobStatus.FAILED
        )
        assert "outside the allowed roots" in load(sessions, job_id).error
        assert pipeline.calls == []
    try:
        link.symlink_to(outside)
        job_id = submit(sessions, spec={"calib": str(link)})
        runner(sessions, store, ScriptedPipeline(), allowed_roots=FAST.allowed_input_roots).run(
            job_id
        )
        assert "outside the allowed roots" in load(sessions, job_id).error
    finally:
        link.unlink(missing_ok=True)


def test_a_failed_jobs_reason_names_no_server_path(
    sessions: sessionmaker[Session], store: ArtifactStore
) -> None:
    """Library errors quote the files they opened; the stored reason keeps the file name, an
    upload's ref, and one line, never the folder (a tenant could probe paths through it)."""
    upload_id = "0b8e3a54-6f1e-4b8e-8a51-3c0f3c9d2f10"

    def missing_upload(_spec: JobSpec, _progress: Progress, workdir: Path) -> Result:
        raise BadDataset(f"dataset file {workdir.parent}/{upload_id}.npz does not exist")

    def crash(_spec: JobSpec, _progress: Progress, _workdir: Path) -> Result:
        raise RuntimeError("Error(s) in loading /srv/models/secret/x.th:\nUnexpected key(s)")

    failed, crashed = submit(sessions), submit(sessions)
    JobRunner(WORKER, sessions, store, pipeline=missing_upload).run(failed)
    JobRunner(WORKER, sessions, store, pipeline=crash).run(crashed)
    assert load(sessions, failed).error == f"dataset file upload:{upload_id} does not exist"
    assert load(sessions, crashed).error == "RuntimeError: Error(s) in loading x.th:"
