"""What only a Celery worker process loads: the task, the database per process, the sweeper.

Imported by the worker through the app's `include` (never by the API), before the prefork pool
forks its children, so every child starts with the pipeline and torch already imported.

The sweeper is a thread in each worker's main process (a bootstep), not a celery beat schedule:
there is no extra process to deploy or to lose, a fleet sweeps as long as one worker is up, and
sweeps from several workers at once are safe (guarded updates; a job sent twice runs once).

Each child disposes the database engine it inherited at fork (`worker_process_init`): a
connection used by two processes corrupts both. Never import FastAPI here.
"""

from __future__ import annotations

import logging
import os
import socket
import warnings
from typing import Any

import redis
from celery import Task, bootsteps
from celery.exceptions import CPendingDeprecationWarning, SoftTimeLimitExceeded
from celery.signals import worker_init, worker_process_init
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from db.cache import StoreCache
from db.session import init_db, make_session_factory
from db.store import open_store
from workers import celery_app
from workers.celery_app import LATENCY_TASK_NAME, PART_TASK_NAME, TASK_NAME, app, settings
from workers.executor import CeleryExecutor
from workers.parts import RedisBoard, help_job
from workers.periodic import Periodic
from workers.runner import JobRunner
from workers.settings import time_limit_error

log = logging.getLogger(__name__)

# Celery warns on every lost broker connection that it will cancel running late-ack tasks by
# default in 6.0. We keep them running on purpose (see celery_app); the warning is noise here.
warnings.filterwarnings(
    "ignore",
    message="(?s).*worker_cancel_long_running_tasks_on_connection_loss",
    category=CPendingDeprecationWarning,
)


class WorkerRuntime:
    """The database, artifact store and cache of one worker process, opened on first use: the main
    process opens it (migrating the schema once) before forking, children reuse the engine
    with a fresh pool."""

    def __init__(self) -> None:
        self._engine: Engine | None = None
        self._sessions: sessionmaker[Session] | None = None
        self.store = open_store()
        self._cache: StoreCache | None = None
        self._redis: redis.Redis | None = None

    @property
    def sessions(self) -> sessionmaker[Session]:
        if self._sessions is None:
            self._engine = init_db()
            self._sessions = make_session_factory(self._engine)
        return self._sessions

    @property
    def cache(self) -> StoreCache:
        """What jobs computed, shared with every worker and API process of the deployment
        through the database and the store (not this machine's folder)."""
        if self._cache is None:
            self._cache = StoreCache(self.sessions, self.store, max_bytes=settings.cache_max_bytes)
        return self._cache

    def board(self, job_id: str, queue: str | None = None) -> RedisBoard:
        """Where this process claims parts of job `job_id`'s statistics (`workers.parts`),
        asking the workers of `queue` for help when given (the job's own worker does)."""
        if self._redis is None:
            self._redis = redis.Redis.from_url(settings.broker_url)
        board = RedisBoard(
            self._redis,
            self.cache,
            job_id,
            f"{socket.gethostname()}:{os.getpid()}",
            settings.lease_seconds,
        )
        if queue is not None:

            def send(part: int, parts: int) -> None:
                app.send_task(PART_TASK_NAME, args=[job_id, part, parts], queue=queue)

            board.send = send
        return board

    def after_fork(self) -> None:
        """Drop the parent's pooled connections without closing them: closing would end the
        parent's sessions on the server too."""
        if self._engine is not None:
            self._engine.dispose(close=False)
        self._redis = None


runtime = WorkerRuntime()


@worker_init.connect
def _open_database(**_: Any) -> None:
    runtime.sessions  # noqa: B018 - opens and migrates the database once, before forking


@worker_process_init.connect
def _reset_after_fork(**_: Any) -> None:
    runtime.after_fork()


@app.task(name=TASK_NAME, bind=True)
def run_job_task(self: Task, job_id: str) -> str | None:
    """Run one job by id; the returned status is for the worker's log only (no result store).

    A soft time limit is a permanent failure: the next attempt would hit it again.
    """
    runner = JobRunner(
        f"{self.request.hostname}:{os.getpid()}",
        runtime.sessions,
        runtime.store,
        lease_seconds=settings.lease_seconds,
        on_ended=celery_app.job_ended_hook,
        permanent_errors={SoftTimeLimitExceeded: time_limit_error(settings.soft_time_limit)},
        limits=settings.limits,
        allowed_roots=settings.allowed_input_roots,
        time_limit=settings.soft_time_limit,
        cache=runtime.cache,
        device=settings.device,
        boards=lambda job: runtime.board(job.id, job.queue),
    )
    status = runner.run(job_id)
    return None if status is None else status.value


@app.task(name=LATENCY_TASK_NAME)
def profile_latency_task(table_id: str) -> str | None:
    """Measure one latency-table request on this machine (the one serving its queue): the
    timings are this worker's CPU's, which is the point. A redelivered message finds the
    request taken and does nothing."""
    from workers.latency import run_request

    return run_request(
        runtime.sessions,
        runtime.store,
        table_id,
        allowed_roots=settings.allowed_input_roots,
        lease_seconds=settings.lease_seconds,
    )


@app.task(name=PART_TASK_NAME)
def statistics_part_task(job_id: str, part: int, parts: int) -> str:
    """Help the worker running `job_id` with one part of its statistics; a redelivered or late
    message finds the part done or the job ended and does nothing."""
    board = runtime.board(job_id)
    return help_job(runtime.sessions, runtime.store, board, part, parts, settings)


class SweeperStep(bootsteps.StartStopStep):
    """Runs `CeleryExecutor.sweep` every `BITPLAN_SWEEP_SECONDS` in the worker's main process,
    started after the pool so the first children fork before the thread exists."""

    requires = ("celery.worker.components:Pool",)

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self.sweeper: Periodic | None = None

    def start(self, parent: Any) -> None:
        executor = CeleryExecutor(
            settings, runtime.sessions, app=app, on_ended=celery_app.job_ended_hook
        )
        self.sweeper = Periodic("bitplan sweeper", settings.sweep_seconds, executor.sweep)
        self.sweeper.start()
        log.info("bitplan sweeper: every %.1f s", settings.sweep_seconds)

    def stop(self, parent: Any) -> None:
        if self.sweeper is not None:
            self.sweeper.stop(timeout=settings.sweep_seconds)
