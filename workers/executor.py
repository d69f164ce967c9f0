"""Executors: how a committed, queued job reaches a worker, embedded or distributed.

One interface with two implementations, chosen by `BITPLAN_EXECUTOR`:

* `InlineExecutor` (the embedded default): worker threads inside the API or CLI process claim
  queued jobs straight from the database (priority, then age; not-before respected), plus a
  lease sweeper and a watchdog: a thread can't be killed, so a job stuck past its time limit in
  a call that never returns is failed, its thread abandoned, and a new thread takes the next job.
  No broker exists, so `dispatch` only wakes an idle thread.
* `CeleryExecutor`: sends a message carrying only the job id to the job's queue (`interactive`
  or `batch`) on the Redis broker; Celery workers run it (`workers.celery_worker`). Its `sweep`,
  run by every worker, repairs what a broker cannot: jobs requeued after their worker died, jobs
  whose message was never sent or was lost with a restarted Redis, and not-before jobs that
  have come due (they are sent then, not with a Celery `eta`: Redis would redeliver an eta
  message held past its visibility timeout, and a worker holds eta messages in memory).

The caller commits the job row first, then dispatches; a dispatch that fails leaves a queued
job the sweeper sends later, never a message for a job that does not exist.

The inline executor imports the pipeline (and torch) when it is built, so an API process that
only sends to Celery never loads torch. Never import FastAPI here.
"""

from __future__ import annotations

import functools
import logging
import os
import socket
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Collection, Sequence
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import redis
from celery import Celery
from kombu.exceptions import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from db import repositories
from db.models import Job, utcnow
from db.repositories import PendingDispatch
from db.store import ArtifactStore
from workers.celery_app import LATENCY_TASK_NAME, TASK_NAME, make_celery
from workers.hooks import JobEndedHook, notify_ended
from workers.periodic import Periodic
from workers.settings import QUEUES, ExecutorKind, WorkerSettings, time_limit_error

if TYPE_CHECKING:
    from workers.runner import JobRunner, Pipeline

log = logging.getLogger(__name__)

BROKER_EPOCH_KEY = "bitplan:broker-epoch"
"""A key the sweeper keeps in the broker's Redis database. Redis keeps no data across a
restart here (and may be flushed or failed over to an empty replica); when the key is gone,
every message it held is gone too, and every queued job is sent again."""


class Executor(ABC):
    """Runs queued jobs somewhere; `dispatch` is called after the job's row is committed."""

    @abstractmethod
    def start(self) -> None: ...

    @abstractmethod
    def stop(self) -> None: ...

    @abstractmethod
    def dispatch(self, job: Job) -> None: ...

    @abstractmethod
    def dispatch_latency(self, table_id: str, queue: str) -> None:
        """Have a stored latency-table request measured (`workers.latency.run_request`) on
        the machines serving `queue`; called after its row is committed."""


class InlineExecutor(Executor):
    """Worker threads in this process that claim jobs from the database.

    Threads poll the table every `poll_seconds` (a not-before job starts within one poll of
    coming due) and wake at once on `dispatch`. On `stop`, a running job is handed back to the
    queue at its next progress call without being charged an attempt.
    """

    def __init__(
        self,
        settings: WorkerSettings,
        sessions: sessionmaker[Session],
        store: ArtifactStore,
        *,
        queues: Collection[str] | None = None,
        pipeline: Pipeline | None = None,
        on_ended: JobEndedHook | None = None,
    ) -> None:
        """`queues=None` serves every queue; `pipeline` replaces the real one in tests only;
        `on_ended` hears of every job these threads or the sweeper end. Jobs keep what they
        compute in the database and the store (`db.cache.StoreCache`), shared with any Celery
        workers of the same deployment."""
        from db.cache import StoreCache  # imported here, as the pipeline: they import torch
        from workers.runner import JobRunner

        self.settings = settings
        self.sessions = sessions
        self.store = store
        self.queues = queues
        self.on_ended = on_ended
        self._stopping = threading.Event()
        self._wake = threading.Semaphore(0)
        self._new_runner = functools.partial(
            JobRunner,
            sessions=sessions,
            store=store,
            lease_seconds=settings.lease_seconds,
            stopping=self._stopping,
            pipeline=pipeline,
            on_ended=on_ended,
            limits=settings.limits,
            allowed_roots=settings.allowed_input_roots,
            time_limit=settings.job_time_limit,
            cache=StoreCache(sessions, store, max_bytes=settings.cache_max_bytes),
            device=settings.device,
        )
        self._prefix = f"{socket.gethostname()}:{os.getpid()}:inline"
        self._generation = 0
        self._workers: list[tuple[JobRunner, threading.Thread]] = [
            self._worker(index) for index in range(settings.inline_workers)
        ]
        self._sweeper = Periodic("bitplan lease sweeper", settings.sweep_seconds, self.sweep)

    @property
    def _threads(self) -> list[threading.Thread]:
        return [thread for _runner, thread in self._workers]

    def _worker(self, index: int) -> tuple[JobRunner, threading.Thread]:
        runner = self._new_runner(f"{self._prefix}-{index}.{self._generation}")
        thread = threading.Thread(
            target=self._work, args=(runner,), name=runner.worker_id, daemon=True
        )
        return runner, thread

    def start(self) -> None:
        for thread in self._threads:
            thread.start()
        self._sweeper.start()
        log.info("inline executor started: %d worker thread(s)", len(self._threads))

    def stop(self, timeout: float | None = 30.0) -> None:
        """Stop claiming, hand running jobs back, and wait up to `timeout` for the threads; a
        thread stuck in a phase that never reports progress is left to die with the process,
        and its job's lease expires."""
        self._stopping.set()
        for _ in self._threads:
            self._wake.release()
        self._sweeper.stop()
        for thread in self._threads:
            thread.join(timeout)
        log.info("inline executor stopped")

    def dispatch(self, job: Job) -> None:
        self._wake.release()

    def dispatch_latency(self, table_id: str, queue: str) -> None:
        """Measured here, in a thread of its own: the embedded service is its own target
        machine whatever the queue says."""
        from workers.latency import run_request

        threading.Thread(
            target=run_request,
            args=(
                self.sessions,
                self.store,
                table_id,
                self.settings.allowed_input_roots,
                self.settings.lease_seconds,
            ),
            name=f"bitplan latency {table_id}",
            daemon=True,
        ).start()

    def sweep(self) -> None:
        """Replace threads stuck past their job's deadline, then requeue jobs whose lease
        expired (a thread of a previous process that died)."""
        self._replace_stuck()
        swept = _requeue_expired(self.sessions, self.on_ended)
        for _ in swept.requeued:
            self._wake.release()

    def _replace_stuck(self) -> None:
        """A job past its deadline that has not stopped at a progress call is stuck in a call
        that never returns: record it as failed, abandon its thread (a daemon; if the call
        ever returns, its progress calls find the job ended and it stops there) and start a
        new thread so the queue keeps moving."""
        now = time.monotonic()
        for index, (runner, _thread) in enumerate(self._workers):
            attempt = runner.attempt
            if attempt is None or now <= attempt.deadline or self._stopping.is_set():
                continue
            runner.retired = True
            with self.sessions() as session:
                status = repositories.fail_job(
                    session,
                    job_id=attempt.job_id,
                    error=time_limit_error(self.settings.job_time_limit),
                )
            log.warning(
                "job %s: stuck past its time limit in %s; recorded as %s, thread replaced",
                attempt.job_id,
                runner.worker_id,
                status or "already ended",
            )
            if status is not None:
                notify_ended(self.on_ended, [attempt.job_id])
            self._generation += 1
            self._workers[index] = self._worker(index)
            self._workers[index][1].start()

    def _work(self, runner: JobRunner) -> None:
        while not self._stopping.is_set() and not runner.retired:
            try:
                with self.sessions() as session:
                    job = repositories.claim_next_job(
                        session,
                        worker_id=runner.worker_id,
                        lease_seconds=self.settings.lease_seconds,
                        queues=self.queues,
                    )
                if job is not None:
                    runner.run_claimed(job)
                    continue
            except Exception:
                log.exception("%s: claiming or running a job failed", runner.worker_id)
            self._wake.acquire(timeout=self.settings.poll_seconds)


class CeleryExecutor(Executor):
    """Sends job ids to Celery workers; `sweep` is run by the workers, not by the API."""

    def __init__(
        self,
        settings: WorkerSettings,
        sessions: sessionmaker[Session],
        *,
        app: Celery | None = None,
        on_ended: JobEndedHook | None = None,
    ) -> None:
        """`on_ended` hears of the jobs a sweep ends (a dead worker's job out of attempts)."""
        self.settings = settings
        self.sessions = sessions
        self.app = app or make_celery(settings)
        self.on_ended = on_ended
        self._redis: redis.Redis | None = None

    def start(self) -> None:
        """Nothing to start: the broker connection opens on the first send."""

    def stop(self) -> None:
        self.app.close()

    def dispatch(self, job: Job) -> None:
        """Send the job now if it is due; a not-before job is sent by a sweep once due."""
        if job.queue not in QUEUES:
            raise ValueError(
                f"job {job.id} names queue {job.queue!r}; a job's queue must be one of "
                f"{', '.join(QUEUES)}"
            )
        if job.not_before is not None and job.not_before > utcnow():
            log.info("job %s: not before %s; a sweep sends it then", job.id, job.not_before)
            return
        self.send([PendingDispatch(job.id, job.queue, job.attempts)])

    def dispatch_latency(self, table_id: str, queue: str) -> None:
        """Sent to the workers serving `queue` (one of `latency_queues`)."""
        if queue not in self.settings.latency_queues:
            raise ValueError(
                f"queue {queue!r} is not one of {', '.join(self.settings.latency_queues)}"
            )
        self.app.send_task(LATENCY_TASK_NAME, args=[table_id], queue=queue)

    def send(self, jobs: Sequence[PendingDispatch]) -> int:
        """Send a message per job and record it; stops at the first broker error (the rest stay
        marked as unsent for the next sweep). How many were sent."""
        sent: list[PendingDispatch] = []
        try:
            for job in jobs:
                self.app.send_task(TASK_NAME, args=[job.id], queue=job.queue)
                sent.append(job)
        except OperationalError as error:
            log.warning(
                "broker unreachable after %d of %d message(s) (%s); the rest stay queued and "
                "a sweep sends them when it is back",
                len(sent),
                len(jobs),
                error,
            )
        if sent:
            with self.sessions() as session:
                repositories.mark_dispatched(session, sent=sent)
        return len(sent)

    def sweep(self) -> None:
        """Requeue jobs whose worker stopped heartbeating, then send every due queued job that
        has no message waiting; after the broker lost its data, every due queued job."""
        _requeue_expired(self.sessions, self.on_ended)
        try:
            everything = self._broker_lost_messages()
        except redis.RedisError as error:
            log.warning("broker unreachable (%s); queued jobs are sent once it is back", error)
            return
        with self.sessions() as session:
            pending = repositories.jobs_to_dispatch(
                session,
                queues=QUEUES,
                include_dispatched=everything,
                limit=None if everything else 1000,
            )
        if not pending:
            return
        sent = self.send(pending)
        log.info(
            "sweep: sent %d of %d queued job(s)%s",
            sent,
            len(pending),
            " again after the broker lost its messages" if everything else "",
        )
        if everything and sent < len(pending):
            self._redis_client().delete(BROKER_EPOCH_KEY)

    def _broker_lost_messages(self) -> bool:
        """True once after the broker's Redis came back empty (and on the very first sweep,
        which sends duplicates at worst). Only Redis brokers lose messages this way."""
        if urlsplit(self.settings.broker_url).scheme not in {"redis", "rediss"}:
            return False
        created = self._redis_client().set(BROKER_EPOCH_KEY, utcnow().isoformat(), nx=True)
        if created:
            log.warning("broker has no %s key: it restarted or was flushed", BROKER_EPOCH_KEY)
        return bool(created)

    def _redis_client(self) -> redis.Redis:
        if self._redis is None:
            self._redis = redis.Redis.from_url(self.settings.broker_url)
        return self._redis


def make_executor(
    settings: WorkerSettings,
    sessions: sessionmaker[Session],
    store: ArtifactStore,
    *,
    on_ended: JobEndedHook | None = None,
) -> Executor:
    """The executor `settings.executor` names (`BITPLAN_EXECUTOR`: inline or celery).

    `on_ended` is called where jobs end: in this process for the inline executor; a Celery
    fleet's jobs end in the workers, which take their hook through `start_worker`.
    """
    if settings.executor is ExecutorKind.CELERY:
        return CeleryExecutor(settings, sessions)
    return InlineExecutor(settings, sessions, store, on_ended=on_ended)


def _requeue_expired(
    sessions: sessionmaker[Session], on_ended: JobEndedHook | None
) -> repositories.LeaseSweep:
    """The lease sweep both executors run: requeue, or end, jobs whose worker went quiet, and
    fail the latency-table requests whose measuring worker did."""
    with sessions() as session:
        swept = repositories.requeue_expired_leases(session)
        latency = repositories.fail_expired_latency_tables(session)
    if latency:
        log.warning("lease expired, latency requests failed: %s", ", ".join(latency))
    for status, ids in (
        ("requeued", swept.requeued),
        ("failed", swept.failed),
        ("cancelled", swept.cancelled),
    ):
        if ids:
            log.warning("lease expired, %s: %s", status, ", ".join(ids))
    notify_ended(on_ended, [*swept.failed, *swept.cancelled])
    return swept
