"""`bitplan serve|worker|keys`: run the service and manage what it reads.

`serve` is the API (with inline workers by default) in this process; `worker` a Celery worker
that POSTs job callbacks as the API does; `keys create|list|revoke` act on the API keys in the
database the service's settings name.

Each command imports the service, database or worker modules it runs, so the rest of the CLI
never loads them. Of `workers/` only its public modules (`settings`, `celery_app`): what runs
inside a worker process is reached through `workers.celery_app`, never imported from here.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from allocator.errors import BitplanError
from service.cli.output import user_errors

if TYPE_CHECKING:
    from datetime import datetime

    from sqlalchemy.orm import Session


def serve_command(
    host: Annotated[str, typer.Option(help="address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option()] = 8000,
    workers: Annotated[
        int, typer.Option(help="job threads per process, with the inline executor")
    ] = 1,
    processes: Annotated[
        int, typer.Option(min=1, help="API processes: more answer more requests per second")
    ] = 1,
    allow_path: Annotated[
        list[Path] | None,
        typer.Option(help="a server folder jobs may name files in, repeatable"),
    ] = None,
    log_level: Annotated[str, typer.Option()] = "info",
) -> None:
    """The API. By default it runs the jobs too (inline executor, SQLite under $BITPLAN_HOME: no
    servers); with BITPLAN_EXECUTOR=celery it queues them for `bitplan worker`."""
    import uvicorn

    from workers.settings import WorkerSettings

    # Options travel to the API processes through the environment they inherit.
    os.environ["BITPLAN_INLINE_WORKERS"] = str(workers)
    roots = [*WorkerSettings.from_env().allowed_input_roots, *(allow_path or [])]
    os.environ["BITPLAN_ALLOWED_INPUT_ROOTS"] = json.dumps([str(root) for root in roots])
    uvicorn.run(
        "service.app:create_app",
        factory=True,
        host=host,
        port=port,
        workers=processes,
        log_level=log_level,
    )


def worker_command(
    queue: Annotated[
        list[str] | None,
        typer.Option(
            help="interactive, batch, gpu or latency, repeatable; default: interactive and batch, "
            "and gpu too with --device cuda"
        ),
    ] = None,
    concurrency: Annotated[int, typer.Option(help="jobs at once, one process each")] = 1,
    device: Annotated[
        str | None,
        typer.Option(
            envvar="BITPLAN_DEVICE",
            help="cpu, cuda or cuda:N: where the jobs that name no device run (default cpu)",
        ),
    ] = None,
) -> None:
    """A Celery worker on $BITPLAN_BROKER_URL and $BITPLAN_DATABASE_URL; it POSTs the callback
    of every job it ends ($BITPLAN_WEBHOOK_*, the same values as the API's)."""
    with user_errors():
        queues = worker_queues(queue, device)
    from service.settings import Settings
    from service.webhooks import JobNotifier
    from workers.celery_app import start_worker, worker_session

    # Both open on first use in whichever process ends a job: the worker's database per process
    # (reset after each fork), the notifier's delivery thread likewise.
    notifier = JobNotifier.from_settings(Settings(), worker_session)
    start_worker(queues, concurrency, on_ended=notifier.notify_ended, on_shutdown=notifier.close)


def worker_queues(queues: list[str] | None, device: str | None) -> tuple[str, ...]:
    """The queues a `bitplan worker` on `device` serves, once the device is known to be there.

    The device travels to the worker's job processes as `BITPLAN_DEVICE` (the Celery app reads
    its settings from the environment, and prefork children inherit it). A worker asked for a
    GPU this machine lacks refuses to start, in one line, rather than failing every job it
    takes; the check goes through NVML where it can, so this process, which forks the job
    processes, does not initialise CUDA (a child of a process that did cannot use it).
    """
    from allocator.job import check_device
    from workers.settings import CPU_QUEUES, GPU_QUEUE

    check_device(device)
    on_gpu = device is not None and device != "cpu"
    if on_gpu:
        from allocator.device import cuda_devices_without_init

        count = cuda_devices_without_init()
        index = int(device.partition(":")[2] or 0)
        if index >= count:
            raise BitplanError(
                f"--device {device}: this machine has {count} GPU(s) that torch can use; start "
                "the worker on a GPU machine, or with --device cpu"
            )
    if device is not None:
        os.environ["BITPLAN_DEVICE"] = device
    default = (*CPU_QUEUES, GPU_QUEUE) if on_gpu else CPU_QUEUES
    return tuple(queues or default)


keys_app = typer.Typer(help="API keys.")


@contextmanager
def _service_database() -> Iterator[Session]:
    """A session on the database the service's settings name (`BITPLAN_DATABASE_URL`, else the
    SQLite file under `BITPLAN_HOME`): the keys commands act on what the API reads."""
    from db.session import default_url, init_db, make_session_factory
    from service.settings import Settings

    settings = Settings()
    engine = init_db(settings.database_url or default_url(settings.home))
    try:
        with make_session_factory(engine)() as session:
            yield session
    finally:
        engine.dispose()


@keys_app.command("create")
def keys_create_command(
    tenant: Annotated[str, typer.Option(help="who the key acts for")],
    name: Annotated[str | None, typer.Option(help="a label for listings")] = None,
) -> None:
    """Print a new API key; it is shown this once (only its hash is stored)."""
    from db import repositories

    with _service_database() as session:
        typer.echo(repositories.create_api_key(session, tenant=tenant, name=name))


@keys_app.command("list")
def keys_list_command(
    tenant: Annotated[str | None, typer.Option(help="only this tenant's keys")] = None,
) -> None:
    """One line per key: prefix, tenant, name, created, revoked (never the key or its hash)."""
    from db import repositories

    with _service_database() as session:
        keys = repositories.list_api_keys(session, tenant=tenant)
    typer.echo(f"{'PREFIX':<10} {'TENANT':<20} {'NAME':<20} {'CREATED':<20} REVOKED")
    for key in keys:
        revoked = _minutes(key.revoked_at) if key.revoked_at else "-"
        typer.echo(
            f"{key.prefix:<10} {key.tenant:<20} {key.name or '-':<20} "
            f"{_minutes(key.created_at):<20} {revoked}"
        )


@keys_app.command("revoke")
def keys_revoke_command(
    prefix: Annotated[str, typer.Argument(help="the key's prefix, as `bitplan keys list` shows")],
    tenant: Annotated[
        str | None, typer.Option(help="the key's tenant, if two tenants have the prefix")
    ] = None,
) -> None:
    """Revoke an active key: API processes refuse it once their key cache forgets it
    (`BITPLAN_KEY_CACHE_SECONDS`)."""
    from db import repositories

    with user_errors(), _service_database() as session:
        active = [
            key
            for key in repositories.list_api_keys(session, tenant=tenant, prefix=prefix)
            if key.revoked_at is None
        ]
        tenants = sorted({key.tenant for key in active})
        if not tenants:
            raise BitplanError(
                f"no active key with prefix {prefix!r}"
                + (f" for tenant {tenant!r}" if tenant else "")
                + "; see `bitplan keys list`"
            )
        if len(tenants) > 1:
            raise BitplanError(
                f"keys of tenants {', '.join(tenants)} have prefix {prefix!r}; pass --tenant"
            )
        repositories.revoke_api_key(session, tenant=tenants[0], prefix=prefix)
    typer.echo(f"revoked {prefix} of tenant {tenants[0]}")


def _minutes(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%d %H:%M UTC")
