"""The job-ended hook: how the service learns that a worker recorded a job's ending.

Webhooks are the service's business, but a job ends wherever it runs (an inline thread, a Celery
child, a sweep that gives up on a dead worker's job). Every such place calls one plain callable
with the job's id, so this package never learns about HTTP and the service never polls.

Never import FastAPI, Celery, SQLAlchemy or torch here.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

log = logging.getLogger(__name__)

JobEndedHook = Callable[[str], None]
"""Called with the id of a job that has just been recorded as succeeded, failed or cancelled."""


def notify_ended(on_ended: JobEndedHook | None, job_ids: Iterable[str]) -> None:
    """Tell the hook; its failure is logged, never the job's: the ending is already recorded."""
    if on_ended is None:
        return
    for job_id in job_ids:
        try:
            on_ended(job_id)
        except Exception:
            log.exception("job %s: the job-ended hook failed", job_id)
