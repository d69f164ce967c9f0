"""bitplan workers: how a queued job gets run, in this process or on a Celery fleet.

- `workers.executor`: `make_executor(settings, sessions, store)` -> `InlineExecutor` (threads
  here, the embedded default) or `CeleryExecutor` (Redis broker); `dispatch(job)` after commit.
- `workers.runner`: `run_job(job_id, worker_id, sessions, store)`, what every worker calls.
- `workers.celery_app`: the Celery app, `start_worker(queues, concurrency)` (`bitplan worker`)
  and `worker_session()`, a session on the calling worker process's database for its hooks.
- `workers.settings`: `WorkerSettings.from_env()`, the `BITPLAN_*` variables.
- `workers.hooks`: `JobEndedHook`, the callable told of every job a worker or sweep ends
  (webhooks).
- `workers.record`: a finished pipeline result into rows and artifacts.

The only package that knows Celery exists; `allocator/` and `db/` never import it, and it never
imports FastAPI. Import the submodules directly: this file re-exports nothing, so an API process
that only sends jobs to Celery imports `workers.executor` without loading torch.
"""
