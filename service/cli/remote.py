"""`bitplan submit|status|wait|fetch`: a job on a bitplan server, through `service.client`.

`submit` takes `run`'s options and queues the job instead, uploading local files first; the
others follow it there. A refusal by the server exits 2, a job that failed or was cancelled 1,
an unreachable server 3.

These commands must answer without loading torch or SQLAlchemy (tests/test_imports.py): this
module imports only `allocator.job` of the allocator, and the client and httpx inside the
commands.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from allocator.job import INPUT_KINDS, JobSpec, UploadKind
from service.cli.options import JsonOpt, KeyOpt, ServerOpt, SpecFactory, spec_options
from service.cli.output import EXIT_USER_ERROR, err, print_summary, user_errors

if TYPE_CHECKING:
    from service.client import BitplanClient

EXIT_JOB_ENDED = 1
EXIT_UNREACHABLE = 3

JobIdArg = Annotated[str, typer.Argument(help="a job id from `bitplan submit`")]


@contextmanager
def remote_errors() -> Iterator[None]:
    """The server's refusal exits 2 like a local user error; a job that failed or was cancelled
    exits 1; an unreachable server exits 3."""
    import httpx

    from service.client import ApiError, JobEnded

    try:
        with user_errors():
            yield
    except ApiError as exc:
        err.print(f"[red]error:[/red] {exc}", highlight=False, soft_wrap=True)
        raise typer.Exit(EXIT_USER_ERROR) from None
    except JobEnded as exc:
        err.print(f"[red]job ended:[/red] {exc}", highlight=False, soft_wrap=True)
        raise typer.Exit(EXIT_JOB_ENDED) from None
    except httpx.TransportError as exc:
        err.print(f"[red]cannot reach the server:[/red] {exc}", highlight=False)
        raise typer.Exit(EXIT_UNREACHABLE) from None


def _client(server: str, key: str) -> BitplanClient:
    from service.client import BitplanClient

    return BitplanClient(server, key)


@spec_options
def submit_command(
    spec: SpecFactory,
    server: ServerOpt,
    key: KeyOpt,
    queue: Annotated[
        str | None,
        typer.Option(help="interactive, batch, or gpu (the workers started with --device cuda)"),
    ] = None,
    priority: Annotated[int, typer.Option(help="higher runs first")] = 0,
    not_before: Annotated[str | None, typer.Option(help="ISO time, e.g. 2025-01-01T22:00Z")] = None,
    callback_url: Annotated[str | None, typer.Option(help="POSTed when the job ends")] = None,
    idempotency_key: Annotated[str | None, typer.Option(help="retry-safe submission key")] = None,
) -> None:
    """Queue a job on a bitplan server, uploading local files first; prints the job id."""
    with remote_errors():
        job_spec = spec()
        with _client(server, key) as client:
            job = client.submit(
                _uploaded(client, job_spec),
                queue=queue,
                priority=priority,
                not_before=not_before,
                callback_url=callback_url,
                idempotency_key=idempotency_key,
            )
    typer.echo(job.id)


def _uploaded(client: BitplanClient, spec: JobSpec) -> JobSpec:
    """`spec` with each local file replaced by its upload ref; anything else (an `upload:` ref,
    a path on the server) is passed on as written. A file named twice is uploaded once, so a
    spec that evaluates on its calibration file (`--eval-on-calibration`) still names one file
    twice on the server."""
    uploads: dict[tuple[UploadKind, str], str] = {}
    refs = {}
    for field, kind in INPUT_KINDS.items():
        value = getattr(spec, field)
        if value is not None and Path(value).is_file():
            if (kind, value) not in uploads:
                uploads[kind, value] = client.upload(kind, value).ref
            refs[field] = uploads[kind, value]
    return replace(spec, **refs)


def status_command(
    job_id: JobIdArg,
    server: ServerOpt,
    key: KeyOpt,
    as_json: JsonOpt = False,
) -> None:
    """A job's status, phase and progress."""
    with remote_errors(), _client(server, key) as client:
        job = client.status(job_id)
    if as_json:
        typer.echo(job.model_dump_json())
        return
    line = f"{job.id}  {job.status.value}  {job.phase or '-'}  {job.progress:.0%}"
    typer.echo(f"{line}  {job.error}" if job.error else line)


def wait_command(
    job_id: JobIdArg,
    server: ServerOpt,
    key: KeyOpt,
    poll: Annotated[float, typer.Option(help="seconds between status checks")] = 2.0,
    as_json: JsonOpt = False,
) -> None:
    """Wait for a job to end and print its result as `bitplan run` does.

    Exits 1 if the job failed or was cancelled.
    """
    with remote_errors(), _client(server, key) as client:
        payload = client.wait_result(job_id, poll=poll)
    if as_json:
        typer.echo(json.dumps(payload))
    else:
        print_summary(payload)


def fetch_command(
    job_id: Annotated[str, typer.Argument(help="a job id")],
    name: Annotated[str, typer.Argument(help="artifact name: model, bitplan, profile, ...")],
    server: ServerOpt,
    key: KeyOpt,
    output: Annotated[Path | None, typer.Option("-o", "--output", help="default: ./NAME")] = None,
) -> None:
    """Download one artifact of a finished job."""
    with remote_errors(), _client(server, key) as client:
        path = client.fetch(job_id, name, output or Path(name))
    typer.echo(str(path))
