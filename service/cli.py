"""The `bitplan` command line: one job on the embedded default, with progress bars, and the
service (serve it, work for it, talk to it).

`bitplan run` runs the pipeline in this process, then records the job, its result and its
artifacts under `$BITPLAN_HOME` (default `./bitplan-data`), with a copy of its HTML report at
`reports/<job id>.html` there. The job is recorded only once it has succeeded, so a run that
fails on bad input leaves everything already stored untouched.
Errors a user can fix print one line and exit 2.

`bitplan serve` is the API with inline workers in one process; `bitplan worker` a Celery worker;
`bitplan keys create|list|revoke` manage API keys. `bitplan submit` takes `run`'s options
(declared once, below) and queues the job on a server instead, uploading local files first;
`status`, `wait` and `fetch` follow it there. A refusal by the server exits 2, a job that failed
or was cancelled 1, an unreachable server 3. The service modules are imported by the commands
that use them, so `bitplan run` never loads the web stack and `submit`, `status`, `wait` and
`fetch` never load torch or SQLAlchemy (they need only `allocator.job` and `service.client`).
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from allocator.errors import BitplanError
from allocator.job import HIGHER_IS_BETTER, INPUT_KINDS, PHASES, JobSpec

if TYPE_CHECKING:
    from datetime import datetime

    from sqlalchemy.orm import Session

    from service.client import BitplanClient

app = typer.Typer(add_completion=False, help="Mixed-precision bit allocation for PyTorch models.")
err = Console(stderr=True)
LOCAL_TENANT = "local"


def _parse_pins(pins: list[str]) -> dict[str, int]:
    parsed = {}
    for pin in pins:
        name, _, bits = pin.partition("=")
        if not name or not bits.isdigit():
            raise BitplanError(f"--pin takes LAYER=BITS (e.g. head=8), got {pin!r}")
        parsed[name] = int(bits)
    return parsed


def _parse_bits(text: str) -> tuple[int, ...]:
    try:
        return tuple(sorted({int(b) for b in text.split(",")}))
    except ValueError:
        raise BitplanError(
            f"--bits takes a comma-separated list such as 2,3,4,8, got {text!r}"
        ) from None


def _parse_act_bits(text: str | None) -> int | str | None:
    """`--act-bits 8` or `--act-bits auto`."""
    if text is None or text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise BitplanError(f"--act-bits takes 4, 6, 8, 16 or auto, got {text!r}") from None


@contextmanager
def _user_errors() -> Iterator[None]:
    try:
        yield
    except BitplanError as exc:
        err.print(f"[red]error:[/red] {exc}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None


@contextmanager
def _progress_bars(enabled: bool) -> Iterator:
    if not enabled:
        yield lambda _phase, _fraction, _message: None
        return
    with Progress(
        TextColumn("{task.description:<12}"),
        BarColumn(),
        TextColumn("{task.fields[message]}"),
        TimeElapsedColumn(),
        console=err,
    ) as bars:
        tasks = {p: bars.add_task(p, total=1.0, message="", visible=False) for p in PHASES}

        def update(phase: str, fraction: float, message: str) -> None:
            task = tasks.get(phase)
            if task is not None:
                bars.update(task, completed=fraction, message=message, visible=True)

        yield update


@app.callback()
def _group() -> None:
    """Keeps `run` a subcommand even while it is the only one."""


DEFAULTS = JobSpec(model="", calib="")
"""Where the spec options' defaults come from, so the CLI and the API cannot drift apart."""

ModelOpt = Annotated[str, typer.Option(help="timm:<name>, hf:<dir> or hf:minilm, zoo:<name>")]
CalibOpt = Annotated[
    str, typer.Option(help=".npz images, STS-B style .csv/.tsv, or .txt text (causal LMs)")
]
WeightsOpt = Annotated[str | None, typer.Option(help=".safetensors or .pth/.th")]
EvalOpt = Annotated[str | None, typer.Option("--eval", help="evaluation data")]
BudgetOpt = Annotated[
    str, typer.Option(help="avg-bits=, size-mb=, compression=, bops=, match=W4A8")
]
MethodOpt = Annotated[str, typer.Option(help="lrp, fisher, hessian, measured, or a+b")]
BitsOpt = Annotated[str, typer.Option(help="candidate weight bit-widths")]
CalibSamplesOpt = Annotated[int, typer.Option()]
BatchSizeOpt = Annotated[int, typer.Option()]
EvalSamplesOpt = Annotated[int | None, typer.Option(help="evaluate on the first N")]
PinOpt = Annotated[list[str] | None, typer.Option(help="LAYER=BITS, repeatable")]
PinFirstLastOpt = Annotated[bool, typer.Option(help="stem and head at 8 bits")]
BiasCorrectionOpt = Annotated[bool, typer.Option()]
TimeLimitOpt = Annotated[float, typer.Option(help="solver seconds")]
SeedOpt = Annotated[int, typer.Option()]
ReportWidthsOpt = Annotated[
    bool, typer.Option(help="also measure uniform W3..W8 for the report (one eval pass each)")
]
ReportOpt = Annotated[bool, typer.Option(help="draw report.html and pareto.png")]
ActBitsOpt = Annotated[
    str | None,
    typer.Option(help="activation bits 4, 6, 8, 16, or auto to allocate them (default: float)"),
]
ActQuantizersOpt = Annotated[str, typer.Option(help="auto, baseline, repq, isvit, dopq or log2")]
JsonOpt = Annotated[bool, typer.Option("--json", help="print one JSON object")]
DEFAULT_BITS_TEXT = ",".join(map(str, DEFAULTS.bits))


def _spec(
    *,
    model: ModelOpt,
    calib: CalibOpt,
    weights: WeightsOpt = DEFAULTS.weights,
    eval: EvalOpt = DEFAULTS.eval,
    budget: BudgetOpt = DEFAULTS.budget,
    method: MethodOpt = DEFAULTS.method,
    bits: BitsOpt = DEFAULT_BITS_TEXT,
    calib_samples: CalibSamplesOpt = DEFAULTS.calib_samples,
    batch_size: BatchSizeOpt = DEFAULTS.batch_size,
    eval_samples: EvalSamplesOpt = DEFAULTS.eval_samples,
    pin: PinOpt = None,
    pin_first_last: PinFirstLastOpt = DEFAULTS.pin_first_last,
    bias_correction: BiasCorrectionOpt = DEFAULTS.bias_correction,
    time_limit: TimeLimitOpt = DEFAULTS.time_limit,
    seed: SeedOpt = DEFAULTS.seed,
    report_widths: ReportWidthsOpt = DEFAULTS.report_widths,
    report: ReportOpt = DEFAULTS.report,
    act_bits: ActBitsOpt = DEFAULTS.act_bits,
    act_quantizers: ActQuantizersOpt = DEFAULTS.act_quantizers,
) -> JobSpec:
    """The validated spec the options of `run` and `submit` describe; its parameters are those
    options (see `spec_options`)."""
    spec = JobSpec(
        model=model,
        weights=weights,
        calib=calib,
        eval=eval,
        budget=budget,
        method=method,
        bits=_parse_bits(bits),
        calib_samples=calib_samples,
        batch_size=batch_size,
        eval_samples=eval_samples,
        pin_first_last=pin_first_last,
        pins=_parse_pins(pin or []),
        bias_correction=bias_correction,
        time_limit=time_limit,
        seed=seed,
        report_widths=report_widths,
        report=report,
        act_bits=_parse_act_bits(act_bits),
        act_quantizers=act_quantizers,
    )
    spec.validate()
    return spec


SpecFactory = Callable[[], JobSpec]
"""What a command decorated with `spec_options` receives as `spec`: building the spec validates
it, so the command calls it inside its own error handling (local or remote)."""


def spec_options(command: Callable[..., None]) -> Callable[..., None]:
    """Give `command` every option of `_spec` besides its own, so `run` and `submit` take the
    same job options from one definition; the command gets them as `spec: SpecFactory`."""
    spec_params = list(inspect.signature(_spec, eval_str=True).parameters.values())
    own = [
        p for p in inspect.signature(command, eval_str=True).parameters.values() if p.name != "spec"
    ]
    names = [p.name for p in spec_params]

    @functools.wraps(command)
    def with_spec(**options: Any) -> None:
        chosen = {name: options.pop(name) for name in names}
        command(spec=functools.partial(_spec, **chosen), **options)

    merged = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in [*spec_params, *own]]
    merged.sort(key=lambda p: p.default is not inspect.Parameter.empty)  # required ones first
    with_spec.__signature__ = inspect.Signature(merged)  # type: ignore[attr-defined]
    with_spec.__annotations__ = {p.name: p.annotation for p in merged}
    return with_spec


@app.command("run")
@spec_options
def run_command(spec: SpecFactory, as_json: JsonOpt = False) -> None:
    """Find and apply the bit allocation for one model and budget, on this machine."""
    from allocator.pipeline import run  # imported here: it loads torch

    with _user_errors():
        job = spec()
        with tempfile.TemporaryDirectory(prefix="bitplan-") as workdir:
            with _progress_bars(sys.stderr.isatty()) as progress:
                result = run(job, progress, workdir)
            payload = _record(job, result)
        kept = _keep_report(payload) if job.report else None
    if as_json:
        typer.echo(json.dumps(payload))
    else:
        _print_summary(payload)
        if kept is not None:
            Console().print(f"open the report in a browser: {kept}", soft_wrap=True)


def _record(spec: JobSpec, result) -> dict:
    """Store the finished job (imports the database layer only once there is something to keep)."""
    from db import repositories
    from db.session import init_db, make_session_factory
    from db.store import ArtifactStore
    from workers.record import record_success

    engine = init_db()
    try:
        with make_session_factory(engine)() as session:
            job, _ = repositories.create_job(session, tenant=LOCAL_TENANT, spec=spec.to_dict())
            return record_success(session, ArtifactStore(), job.id, result)
    finally:
        # Closing the pool checkpoints SQLite's WAL now, not whenever the engine is collected.
        engine.dispose()


def _keep_report(payload: dict) -> Path:
    """A copy of the job's report at `$BITPLAN_HOME/reports/<job id>.html`: the artifact store
    names files by their hash, without a suffix, and browsers will not open that as a page."""
    from db.home import bitplan_home

    target = bitplan_home() / "reports" / f"{payload['job_id']}.html"
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(payload["artifacts"]["report"], target)
    return target


def _print_summary(payload: dict) -> None:
    out = Console()
    metrics = payload["metrics"]
    primary = metrics["primary"]
    out.print(f"job {payload['job_id']}  {payload['model']}  budget {payload['budget']}")
    out.print(
        f"avg weight bits {payload['avg_weight_bits']:.3f}  "
        f"weight bytes {payload['weight_bytes']:.0f}  "
        f"solver {payload['solver']['name']} {payload['solver']['status']}"
    )
    direction = "" if HIGHER_IS_BETTER.get(primary, True) else " (lower is better)"
    out.print(
        f"{primary}{direction}: fp32 {metrics['fp32'][primary]:.2f}  "
        f"mixed {metrics['quantized'][primary]:.2f}  "
        + (
            f"uniform W{metrics['uniform']['bits']} {metrics['uniform'][primary]:.2f}"
            if metrics["uniform"]
            else "uniform: none fits"
        )
    )
    for name, path in payload["artifacts"].items():
        out.print(f"{name}: {path}", soft_wrap=True)


# --- the service: serve it, work for it, talk to it ----------------------------------------------

ServerOpt = Annotated[
    str, typer.Option(envvar="BITPLAN_SERVER", help="the API's base URL, e.g. http://host:8000")
]
KeyOpt = Annotated[str, typer.Option(envvar="BITPLAN_API_KEY", help="an API key (bp_...)")]
EXIT_JOB_ENDED = 1
EXIT_UNREACHABLE = 3

keys_app = typer.Typer(help="API keys.")
app.add_typer(keys_app, name="keys")


@contextmanager
def _remote_errors() -> Iterator[None]:
    """The server's refusal exits 2 like a local user error; a job that failed or was cancelled
    exits 1; an unreachable server exits 3."""
    import httpx

    from service.client import ApiError, JobEnded

    try:
        with _user_errors():
            yield
    except ApiError as exc:
        err.print(f"[red]error:[/red] {exc}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    except JobEnded as exc:
        err.print(f"[red]job ended:[/red] {exc}", highlight=False, soft_wrap=True)
        raise typer.Exit(EXIT_JOB_ENDED) from None
    except httpx.TransportError as exc:
        err.print(f"[red]cannot reach the server:[/red] {exc}", highlight=False)
        raise typer.Exit(EXIT_UNREACHABLE) from None


def _client(server: str, key: str) -> BitplanClient:
    from service.client import BitplanClient

    return BitplanClient(server, key)


@app.command("serve")
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


@app.command("worker")
def worker_command(
    queue: Annotated[
        list[str] | None, typer.Option(help="interactive or batch, repeatable; default both")
    ] = None,
    concurrency: Annotated[int, typer.Option(help="jobs at once, one process each")] = 1,
) -> None:
    """A Celery worker on $BITPLAN_BROKER_URL and $BITPLAN_DATABASE_URL; it POSTs the callback
    of every job it ends ($BITPLAN_WEBHOOK_*, the same values as the API's)."""
    from service.settings import Settings
    from service.webhooks import JobNotifier
    from workers.celery_app import start_worker
    from workers.celery_worker import runtime
    from workers.settings import QUEUES

    # Both open on first use in whichever process ends a job: the worker's database per process
    # (reset after each fork), the notifier's delivery thread likewise.
    notifier = JobNotifier.from_settings(Settings(), lambda: runtime.sessions())
    start_worker(
        queue or QUEUES, concurrency, on_ended=notifier.notify_ended, on_shutdown=notifier.close
    )


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

    with _user_errors(), _service_database() as session:
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


@app.command("submit")
@spec_options
def submit_command(
    spec: SpecFactory,
    server: ServerOpt,
    key: KeyOpt,
    queue: Annotated[str | None, typer.Option(help="interactive or batch")] = None,
    priority: Annotated[int, typer.Option(help="higher runs first")] = 0,
    not_before: Annotated[str | None, typer.Option(help="ISO time, e.g. 2025-01-01T22:00Z")] = None,
    callback_url: Annotated[str | None, typer.Option(help="POSTed when the job ends")] = None,
    idempotency_key: Annotated[str | None, typer.Option(help="retry-safe submission key")] = None,
) -> None:
    """Queue a job on a bitplan server, uploading local files first; prints the job id."""
    with _remote_errors():
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
    a path on the server) is passed on as written."""
    refs = {
        field: client.upload(kind, value).ref
        for field, kind in INPUT_KINDS.items()
        if (value := getattr(spec, field)) is not None and Path(value).is_file()
    }
    return replace(spec, **refs)


@app.command("status")
def status_command(
    job_id: Annotated[str, typer.Argument(help="a job id from `bitplan submit`")],
    server: ServerOpt,
    key: KeyOpt,
    as_json: JsonOpt = False,
) -> None:
    """A job's status, phase and progress."""
    with _remote_errors(), _client(server, key) as client:
        job = client.status(job_id)
    if as_json:
        typer.echo(job.model_dump_json())
        return
    line = f"{job.id}  {job.status.value}  {job.phase or '-'}  {job.progress:.0%}"
    typer.echo(f"{line}  {job.error}" if job.error else line)


@app.command("wait")
def wait_command(
    job_id: Annotated[str, typer.Argument(help="a job id from `bitplan submit`")],
    server: ServerOpt,
    key: KeyOpt,
    poll: Annotated[float, typer.Option(help="seconds between status checks")] = 2.0,
    as_json: JsonOpt = False,
) -> None:
    """Wait for a job to end and print its result as `bitplan run` does.

    Exits 1 if the job failed or was cancelled.
    """
    with _remote_errors(), _client(server, key) as client:
        payload = client.wait_result(job_id, poll=poll)
    if as_json:
        typer.echo(json.dumps(payload))
    else:
        _print_summary(payload)


@app.command("fetch")
def fetch_command(
    job_id: Annotated[str, typer.Argument(help="a job id")],
    name: Annotated[str, typer.Argument(help="artifact name: model, bitplan, profile, ...")],
    server: ServerOpt,
    key: KeyOpt,
    output: Annotated[Path | None, typer.Option("-o", "--output", help="default: ./NAME")] = None,
) -> None:
    """Download one artifact of a finished job."""
    with _remote_errors(), _client(server, key) as client:
        path = client.fetch(job_id, name, output or Path(name))
    typer.echo(str(path))


def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    app()


if __name__ == "__main__":
    main()
