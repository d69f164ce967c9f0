"""The Celery application: broker settings and queues, shared by the API and the workers.

`celery -A workers.celery_app worker` and `bitplan worker` (through `start_worker`) run this app;
the API process builds it only to send tasks by name. What only a worker process needs (the
task, the database per process, the sweeper) is in `workers.celery_worker`, listed in `include`
so that the API never imports the pipeline and torch with it.

Settings follow one rule: the database row is the truth about a job and Celery only delivers
job ids. A message is acknowledged after the task ran (`task_acks_late`) and put back if the
process running it died (`task_reject_on_worker_lost`); each process reserves one message at a
time (`worker_prefetch_multiplier=1`) so a long job never holds a second one hostage; Redis
redelivers an unacknowledged message only after a visibility timeout above the longest job;
results are not stored (the result row is). Redelivery is always safe because a task claims its
job in the database first and does nothing if the job is not queued.

Only this package knows Celery exists. Never import FastAPI, SQLAlchemy or torch here at
module level: `worker_session` reaches `workers.celery_worker` only when a worker process calls it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from celery import Celery
from celery.signals import worker_process_shutdown, worker_shutdown
from kombu import Exchange, Queue

from workers.hooks import JobEndedHook
from workers.settings import BATCH_QUEUE, QUEUES, WorkerSettings

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

TASK_NAME = "bitplan.run_job"
LATENCY_TASK_NAME = "bitplan.profile_latency"
"""Measures one latency-table request (`workers.latency.run_request`) on the machine whose
worker serves the request's queue."""
PART_TASK_NAME = "bitplan.statistics_part"
"""Computes one part of a running job's statistics for the worker running the job
(`workers.parts`), on the job's queue."""
WORKER_MODULE = "workers.celery_worker"
PUBLISH_RETRY_POLICY = {"max_retries": 2, "interval_start": 0, "interval_step": 0.5}
"""A dispatch to an unreachable broker gives up within about a second: the job row is already
committed, the sweeper sends it once the broker is back, and an API request must not hang."""


def make_celery(settings: WorkerSettings) -> Celery:
    """A Celery app configured for bitplan; the API and the workers must build it alike."""
    app = Celery("bitplan", include=[WORKER_MODULE])
    app.conf.update(
        broker_url=settings.broker_url,
        broker_connection_retry_on_startup=True,
        broker_transport_options={"visibility_timeout": settings.visibility_timeout},
        result_backend=None,
        task_ignore_result=True,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        # A job keeps running when Redis blinks: its lease in the database protects it.
        worker_cancel_long_running_tasks_on_connection_loss=False,
        task_soft_time_limit=settings.soft_time_limit,
        task_time_limit=settings.job_time_limit,
        task_queues=[
            Queue(name, Exchange(name), routing_key=name) for name in settings.worker_queues
        ],
        task_default_queue=BATCH_QUEUE,
        task_create_missing_queues=False,
        task_serializer="json",
        accept_content=["json"],
        task_publish_retry_policy=PUBLISH_RETRY_POLICY,
    )
    # By name: resolved only when a worker builds its blueprint, after importing WORKER_MODULE.
    app.steps["worker"].add(f"{WORKER_MODULE}:SweeperStep")
    return app


settings = WorkerSettings.from_env()
app = make_celery(settings)
job_ended_hook: JobEndedHook | None = None
"""Set by `start_worker`, read by the worker's task and sweeper; pool children inherit it."""


def worker_session() -> Session:
    """A new session on the database of the worker process that calls it, for the hooks given to
    `start_worker` (what `bitplan worker`'s webhook notifier reads jobs with). Each process opens
    its database on first use and drops the parent's connections after a fork."""
    from workers.celery_worker import runtime  # a worker has imported it already (`include`)

    return runtime.sessions()


def start_worker(
    queues: Sequence[str] = QUEUES,
    concurrency: int = 1,
    *,
    loglevel: str = "INFO",
    on_ended: JobEndedHook | None = None,
    on_shutdown: Callable[[], None] | None = None,
) -> None:
    """Run a Celery worker in this process until it is stopped (what `bitplan worker` does).

    `concurrency` is the number of jobs run at once, each in its own process; a job already
    uses every core through torch, so more than one per machine rarely pays. The pool is
    prefork: its parent survives a child killed mid-job (out of memory, a crashing native
    library) and starts a new one, and only prefork enforces the hard time limit.

    `on_ended(job_id)` runs in whichever process ended the job (a pool child, or the main
    process's sweeper), after a fork: it must open its own connections and threads on first
    use in each process, not before calling this. `on_shutdown()` runs as each of those
    processes exits (to finish what `on_ended` started, such as webhook deliveries in flight).
    """
    global job_ended_hook
    unknown = sorted(set(queues) - set(settings.worker_queues))
    if unknown or not queues:
        raise ValueError(
            f"queues must be among {', '.join(settings.worker_queues)}; got {list(queues)}"
        )
    if concurrency < 1:
        raise ValueError(f"concurrency must be at least 1, got {concurrency}")
    job_ended_hook = on_ended
    if on_shutdown is not None:
        for signal in (worker_process_shutdown, worker_shutdown):
            signal.connect(lambda **_: on_shutdown(), weak=False)
    app.worker_main(
        [
            "worker",
            f"--queues={','.join(queues)}",
            f"--concurrency={concurrency}",
            "--pool=prefork",
            f"--loglevel={loglevel}",
            # Workers share nothing but the broker and the database; skipping the start-up
            # handshake with other workers saves a second per start.
            "--without-mingle",
            "--without-gossip",
        ]
    )
