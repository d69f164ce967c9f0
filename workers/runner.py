"""Run one job in this process and leave its row saying how it ended, whoever called us.

The inline executor's threads and the Celery task both end up here, so a job behaves the same
embedded and distributed: it is claimed in the database before any work (a redelivered broker
message finds it taken and does nothing), its uploads are linked into a private folder
(`runnable_spec`), its lease is kept alive from a background thread while the pipeline runs (a
worker that dies stops heartbeating and the sweeper requeues the job), the cancel flag is read
from the pipeline's progress callback (so a cancel lands between phases or layers), and every
ending is written through `db.repositories` and `workers.record`: succeeded with its result,
cancelled, failed for good (the user's input: `BitplanError`), or failed and requeued while
attempts remain (anything else: a crash or a lost connection may not happen again).

Every database call opens its own short session: a session held across a job that runs for
hours would sit idle in a transaction on PostgreSQL, holding back vacuum and a connection.

Imports the pipeline (and so torch); never imports FastAPI or Celery.
"""

from __future__ import annotations

import logging
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from allocator.cache import Cache, FolderCache
from allocator.errors import BitplanError, JobCancelled
from allocator.job import PHASES, TERMINAL_STATUSES, JobSpec, JobStatus, Progress, Result
from allocator.limits import Limits
from allocator.pipeline import run
from allocator.split import Board
from db import repositories
from db.home import cache_folder
from db.models import Job
from db.store import ArtifactStore
from workers.hooks import JobEndedHook, notify_ended
from workers.periodic import Periodic
from workers.record import public_error, record_success, runnable_spec
from workers.settings import WorkerSettings, time_limit_error

log = logging.getLogger(__name__)

Pipeline = Callable[[JobSpec, Progress, Path], Result]
"""`allocator.pipeline.run`'s shape; replaceable only so tests can drive the lease mechanics."""

DEFAULT_LEASE_SECONDS = WorkerSettings().lease_seconds
DEFAULT_TIME_LIMIT = WorkerSettings().job_time_limit
PROGRESS_WRITE_SECONDS = 1.0
"""Progress inside a phase is written at most this often; a phase change is written at once."""


class InvalidSpec(BitplanError):
    """A stored spec that does not describe a job (unknown or mistyped fields)."""


class _Abandoned(JobCancelled):
    """Stops the pipeline through its cancellation path when this worker must drop the job
    without recording an ending of its own."""


class _LeaseLost(_Abandoned):
    """The job is no longer ours: the lease expired and it was requeued, or it ended."""


class _Stopping(_Abandoned):
    """This worker is shutting down; the job goes back to the queue uncharged."""


class _TimeUp(_Abandoned):
    """The attempt is past its deadline; the runner records it as failed for good."""


@dataclass(frozen=True)
class Attempt:
    """The job a runner is working on, and when its time is up (monotonic seconds)."""

    job_id: str
    deadline: float


class JobRunner:
    """Runs jobs for one worker identity; one instance serves many jobs, one at a time per
    calling thread."""

    def __init__(
        self,
        worker_id: str,
        sessions: sessionmaker[Session],
        store: ArtifactStore,
        *,
        lease_seconds: float = DEFAULT_LEASE_SECONDS,
        permanent_errors: Mapping[type[Exception], str] | None = None,
        stopping: threading.Event | None = None,
        pipeline: Pipeline | None = None,
        on_ended: JobEndedHook | None = None,
        limits: Limits | None = None,
        allowed_roots: Sequence[Path] | None = None,
        time_limit: float = DEFAULT_TIME_LIMIT,
        cache: Cache | None = None,
        device: str | None = None,
        boards: Callable[[Job], Board] | None = None,
    ) -> None:
        """`permanent_errors` maps failures besides `BitplanError` that would happen again on
        every attempt (a time limit) to the error to record; `stopping`, once set, hands
        running jobs back; `on_ended` hears of every ending this runner records; `limits`
        and `allowed_roots` bound what a job may make this worker do and read (None: no path
        check, for the CLI's own jobs); past `time_limit` seconds an attempt stops at its next
        progress call and its lease is no longer renewed; `cache` keeps what jobs computed
        (a service passes `db.cache.StoreCache`, shared through the database and the store;
        None: the folder under this machine's home); `device` runs the jobs whose spec names
        none there (the worker's `BITPLAN_DEVICE`; None: the CPU); `boards(job)` is where a
        job that splits its statistics finds helpers (`workers.parts`; None: it computes every
        part itself)."""
        self.worker_id = worker_id
        self.sessions = sessions
        self.store = store
        self.lease_seconds = lease_seconds
        self.permanent_errors = dict(permanent_errors or {})
        self.stopping = stopping or threading.Event()
        cache = cache if cache is not None else FolderCache(cache_folder())
        self.pipeline = pipeline or partial(run, limits=limits, cache=cache)
        self.on_ended = on_ended
        self.allowed_roots = allowed_roots
        self.time_limit = time_limit
        self.device = device
        self.boards = boards
        self.attempt: Attempt | None = None
        """Read by the inline executor's watchdog, which ends attempts that stopped calling
        back past their deadline."""
        self.retired = False
        """Set by that watchdog: this runner's thread was replaced and takes no more jobs."""

    def run(self, job_id: str) -> JobStatus | None:
        """Claim and run the job; a job that is not queued any more is left alone."""
        with self.sessions() as session:
            job = repositories.claim_job(
                session, job_id=job_id, worker_id=self.worker_id, lease_seconds=self.lease_seconds
            )
        if job is None:
            status = job_status(self.sessions, job_id)
            log.info(
                "job %s not run by %s: it is %s, not queued (taken by another worker, finished "
                "or cancelled)",
                job_id,
                self.worker_id,
                status or "unknown",
            )
            return status
        return self.run_claimed(job)

    def run_claimed(self, job: Job) -> JobStatus | None:
        """Run a job this worker has just claimed, and record how it ended; the job's status
        afterwards (queued again if it failed with attempts left)."""
        log.info(
            "job %s: attempt %d/%d started by %s",
            job.id,
            job.attempts,
            job.max_attempts,
            self.worker_id,
        )
        self.attempt = Attempt(job.id, time.monotonic() + self.time_limit)
        lease = _Lease(job.id, self.worker_id, self.sessions, self.lease_seconds, self.attempt)
        progress = _ProgressReporter(job.id, self.sessions, lease, self.stopping, self.attempt)
        started = time.perf_counter()
        with lease, tempfile.TemporaryDirectory(prefix=f"bitplan-{job.id}-") as workdir:
            try:
                spec = self._spec(job, Path(workdir))
                if spec.device is None:  # the tenant left it to the worker
                    spec = replace(spec, device=self.device)
                pipeline = self.pipeline
                if self.boards is not None and spec.statistics_parts > 1:
                    pipeline = partial(pipeline, board=self.boards(job))
                result = pipeline(spec, progress, Path(workdir) / "artifacts")
                return self._succeed(job, result, time.perf_counter() - started)
            except _LeaseLost as lost:
                log.warning("job %s: dropped by %s: %s", job.id, self.worker_id, lost)
                return job_status(self.sessions, job.id)
            except _Stopping:
                return self._release(job)
            except _TimeUp:
                return self._fail(job, time_limit_error(self.time_limit), retryable=False)
            except JobCancelled:
                return self._cancel(job, progress.phase)
            except BitplanError as error:
                reason = public_error(str(error) or type(error).__name__, Path(workdir))
                return self._fail(job, reason, retryable=False)
            except Exception as error:
                permanent = self._permanent_error(error)
                if permanent is not None:
                    return self._fail(job, permanent, retryable=False)
                log.exception("job %s: attempt %d crashed", job.id, job.attempts)
                reason = public_error(f"{type(error).__name__}: {error}", Path(workdir))
                return self._fail(job, reason, retryable=True)
            finally:
                self.attempt = None

    def _permanent_error(self, error: Exception) -> str | None:
        return next(
            (text for kind, text in self.permanent_errors.items() if isinstance(error, kind)),
            None,
        )

    def _spec(self, job: Job, folder: Path) -> JobSpec:
        """The spec with uploads linked into `folder`; one the pipeline cannot read is the
        submitter's error, as final as a `BitplanError`."""
        try:
            with self.sessions() as session:
                return runnable_spec(session, self.store, job, folder, self.allowed_roots)
        except (TypeError, ValueError) as error:
            raise InvalidSpec(f"invalid job spec: {error}") from error

    def _succeed(self, job: Job, result: Result, seconds: float) -> JobStatus | None:
        with self.sessions() as session:
            record_success(session, self.store, job.id, result)
        status = job_status(self.sessions, job.id)
        if status != JobStatus.SUCCEEDED:
            log.warning(
                "job %s: finished after %.1f s but the job had already ended as %s; this "
                "result was not recorded",
                job.id,
                seconds,
                status,
            )
            return status
        log.info("job %s: succeeded in %.1f s on attempt %d", job.id, seconds, job.attempts)
        return self._ended(job.id, status)

    def _fail(self, job: Job, error: str, *, retryable: bool) -> JobStatus | None:
        with self.sessions() as session:
            status = repositories.fail_job(session, job_id=job.id, error=error, retryable=retryable)
        log.warning(
            "job %s: attempt %d/%d failed (%s): %s; the job is now %s",
            job.id,
            job.attempts,
            job.max_attempts,
            "may retry" if retryable else "will not retry",
            error,
            status or "already ended",
        )
        return self._ended(job.id, status)

    def _cancel(self, job: Job, phase: str | None) -> JobStatus | None:
        with self.sessions() as session:
            repositories.cancel_job(session, job_id=job.id)
        log.info("job %s: cancelled during phase %s", job.id, phase)
        return self._ended(job.id, job_status(self.sessions, job.id))

    def _ended(self, job_id: str, status: JobStatus | None) -> JobStatus | None:
        if status in TERMINAL_STATUSES:
            notify_ended(self.on_ended, [job_id])
        return status

    def _release(self, job: Job) -> JobStatus | None:
        with self.sessions() as session:
            released = repositories.release_job(session, job_id=job.id, worker_id=self.worker_id)
        log.info(
            "job %s: %s while %s shuts down",
            job.id,
            "handed back to the queue" if released else "already taken from this worker",
            self.worker_id,
        )
        return job_status(self.sessions, job.id)


def run_job(
    job_id: str,
    worker_id: str,
    sessions: sessionmaker[Session],
    store: ArtifactStore,
    *,
    lease_seconds: float = DEFAULT_LEASE_SECONDS,
) -> JobStatus | None:
    """Claim and run one job by id; its status afterwards, None if there is no such job."""
    return JobRunner(worker_id, sessions, store, lease_seconds=lease_seconds).run(job_id)


def job_status(sessions: sessionmaker[Session], job_id: str) -> JobStatus | None:
    with sessions() as session:
        status = session.scalar(select(Job.status).where(Job.id == job_id))
    return None if status is None else JobStatus(status)


class _Lease:
    """Heartbeats a claimed job from a background thread, so the lease stays alive through a
    long phase that never calls back (a solver run, one big layer)."""

    def __init__(
        self,
        job_id: str,
        worker_id: str,
        sessions: sessionmaker[Session],
        lease_seconds: float,
        attempt: Attempt,
    ) -> None:
        self.job_id = job_id
        self.worker_id = worker_id
        self.sessions = sessions
        self.lease_seconds = lease_seconds
        self.attempt = attempt
        self.lost = threading.Event()
        self._beats = Periodic(f"heartbeat {job_id}", lease_seconds / 3, self._beat)

    def __enter__(self) -> _Lease:
        self._beats.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._beats.stop()

    def _beat(self) -> None:
        """Renew the lease until the attempt's deadline: past it, a job stuck in a call that
        never returns lets its lease run out, and the sweeper takes it from this worker."""
        if self.lost.is_set() or time.monotonic() > self.attempt.deadline:
            return
        with self.sessions() as session:
            held = repositories.heartbeat(
                session,
                job_id=self.job_id,
                worker_id=self.worker_id,
                lease_seconds=self.lease_seconds,
            )
        if not held:
            log.warning("job %s: %s lost its lease", self.job_id, self.worker_id)
            self.lost.set()


class _ProgressReporter:
    """The pipeline's progress callback: writes the phase and overall progress (throttled) and
    is where the pipeline learns, by an exception, that it must stop."""

    def __init__(
        self,
        job_id: str,
        sessions: sessionmaker[Session],
        lease: _Lease,
        stopping: threading.Event,
        attempt: Attempt,
    ) -> None:
        self.job_id = job_id
        self.sessions = sessions
        self.lease = lease
        self.stopping = stopping
        self.attempt = attempt
        self.phase: str | None = None
        self._last_write = 0.0

    def __call__(self, phase: str, fraction: float, _message: str) -> None:
        if self.lease.lost.is_set():
            raise _LeaseLost("another worker may have taken the job; stopped this attempt")
        if self.stopping.is_set():
            raise _Stopping("worker shutting down")
        now = time.monotonic()
        if now > self.attempt.deadline:
            raise _TimeUp("past the time limit")
        if phase == self.phase and now - self._last_write < PROGRESS_WRITE_SECONDS:
            return
        self.phase, self._last_write = phase, now
        with self.sessions() as session:
            running = repositories.update_progress(
                session, job_id=self.job_id, phase=phase, progress=overall_progress(phase, fraction)
            )
            cancel = repositories.is_cancel_requested(session, job_id=self.job_id)
        if cancel:
            raise JobCancelled(f"cancelled during phase {phase}")
        if not running:
            raise _LeaseLost("the job is not running any more")


def overall_progress(phase: str, fraction: float) -> float:
    """The job's progress from one phase's fraction, counting every phase as an equal step;
    a phase the pipeline did not declare keeps the fraction as given."""
    if phase not in PHASES:
        return fraction
    return (PHASES.index(phase) + min(max(fraction, 0.0), 1.0)) / len(PHASES)
