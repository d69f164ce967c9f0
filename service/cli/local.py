"""`bitplan run`: one job in this process, with progress bars, recorded on the embedded default.

The job runs in a temporary folder, then the job, its result and its artifacts are recorded
under `$BITPLAN_HOME` (default `./bitplan-data`), with a copy of its HTML report at
`reports/<job id>.html` there. The job is recorded only once it has succeeded, so a run that
fails on bad input leaves everything already stored untouched.

The pipeline (torch) and the database layer are imported inside the command, so loading the CLI
for another command loads neither; this module never imports the web stack.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from allocator.errors import BadSpec
from allocator.job import PHASES, JobSpec
from service.cli.options import JsonOpt, SpecFactory, spec_options
from service.cli.output import err, print_summary, user_errors

LOCAL_TENANT = "local"
DEVICE_ENV = "BITPLAN_DEVICE"
"""The device `run` uses when `--device` is not given (the worker reads the same variable)."""


@spec_options
def run_command(spec: SpecFactory, as_json: JsonOpt = False) -> None:
    """Find and apply the bit allocation for one model and budget, on this machine."""
    from allocator.cache import FolderCache  # imported here: it loads torch
    from allocator.pipeline import run
    from db.home import cache_folder

    with user_errors():
        job = spec()
        if job.device is None and os.environ.get(DEVICE_ENV):
            job = replace(job, device=os.environ[DEVICE_ENV])
            job.validate()
        with tempfile.TemporaryDirectory(prefix="bitplan-") as workdir:
            runnable = _with_latency_file(job, Path(workdir))
            with _progress_bars(sys.stderr.isatty()) as progress:
                cache = FolderCache(cache_folder(), max_bytes=_cache_bound())
                result = run(runnable, progress, workdir, cache=cache)
            payload = _record(job, result)
        kept = _keep_report(payload) if job.report else None
    if as_json:
        typer.echo(json.dumps(payload))
    else:
        print_summary(payload)
        if kept is not None:
            Console().print(f"open the report in a browser: {kept}", soft_wrap=True)


def _cache_bound() -> int:
    """`BITPLAN_CACHE_MAX_BYTES` as the workers read it; a bad value is one line, not a
    traceback."""
    from workers.settings import WorkerSettings

    try:
        return WorkerSettings.from_env().cache_max_bytes
    except ValueError as exc:
        raise BadSpec(f"{exc}; fix or unset the variable") from None


@contextmanager
def _progress_bars(enabled: bool) -> Iterator:
    """A progress callback for the pipeline: one bar per phase on stderr, or nothing."""
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


def _with_latency_file(spec: JobSpec, folder: Path) -> JobSpec:
    """A `--latency-table` id read from this machine's database into a file in `folder`, as a
    worker does for a server's job; a file path stays as given."""
    from workers.record import LATENCY_TABLE_ID

    if spec.latency_table is None or not LATENCY_TABLE_ID.fullmatch(spec.latency_table):
        return spec
    from db.session import init_db, make_session_factory
    from workers.record import latency_table_file

    engine = init_db()
    try:
        with make_session_factory(engine)() as session:
            path = latency_table_file(session, LOCAL_TENANT, spec.latency_table, folder)
    finally:
        engine.dispose()
    return replace(spec, latency_table=str(path))


def _record(spec: JobSpec, result) -> dict:
    """Store the finished job (imports the database layer only once there is something to keep)."""
    from db import repositories
    from db.session import init_db, make_session_factory
    from db.store import open_store
    from workers.record import record_success

    engine = init_db()
    try:
        with make_session_factory(engine)() as session:
            job, _ = repositories.create_job(session, tenant=LOCAL_TENANT, spec=spec.to_dict())
            return record_success(session, open_store(), job.id, result)
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
