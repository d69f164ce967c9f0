"""`bitplan export JOB --format onnx`: a finished job's model in a runtime format, checked in
that runtime before it is written.

With `--server` (or `BITPLAN_SERVER`) the job is on a bitplan server and the file comes from
`GET /v1/jobs/{id}/artifacts/onnx` through `service.client`; without, the job is one `bitplan
run` recorded under `$BITPLAN_HOME` and the export runs in this process
(`workers.exports.export_artifact`). Either way a job that did not export as it ran is exported
now, its parity with bitplan's model measured in ONNX Runtime and recorded in its result, and
a refusal or a failed check is one line (exit 2). Heavy modules are imported inside the
command.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Annotated

import typer

from allocator.job import EXPORT_FORMATS
from allocator.job_metrics import ExportCheck
from service.cli.local import LOCAL_TENANT
from service.cli.output import user_errors
from service.cli.remote import remote_errors

FormatOpt = Annotated[str, typer.Option("--format", help=" or ".join(EXPORT_FORMATS))]
OutputOpt = Annotated[Path | None, typer.Option("-o", "--output", help="default: ./JOB.onnx")]
OptionalServerOpt = Annotated[
    str | None,
    typer.Option(envvar="BITPLAN_SERVER", help="a bitplan server (default: this machine's jobs)"),
]
OptionalKeyOpt = Annotated[
    str | None, typer.Option(envvar="BITPLAN_API_KEY", help="an API key, with --server")
]


def export_command(
    job_id: Annotated[str, typer.Argument(help="a job id from `bitplan run` or `submit`")],
    fmt: FormatOpt = "onnx",
    output: OutputOpt = None,
    server: OptionalServerOpt = None,
    key: OptionalKeyOpt = None,
) -> None:
    """Export a finished job's model (ONNX QDQ), checked in ONNX Runtime against bitplan's."""
    target = output or Path(f"{job_id}.{fmt}")
    if server:
        with remote_errors():
            check = _remote(server, key or "", job_id, fmt, target)
    else:
        with user_errors():
            check = _local(job_id, fmt, target)
    typer.echo(str(target))
    if check is not None:
        typer.echo(check.text())


def _remote(server: str, key: str, job_id: str, fmt: str, target: Path) -> ExportCheck | None:
    from allocator.job import check_export_formats
    from service.client import BitplanClient

    check_export_formats((fmt,))
    with BitplanClient(server, key) as client:
        client.export(job_id, target, fmt)
        exports = client.result(job_id)["metrics"].get("exports") or {}
    return ExportCheck.from_dict(exports[fmt]) if fmt in exports else None


def _local(job_id: str, fmt: str, target: Path) -> ExportCheck | None:
    from db import repositories
    from db.session import init_db, make_session_factory
    from db.store import open_store
    from workers.exports import export_artifact

    engine = init_db()
    try:
        sessions = make_session_factory(engine)
        store = open_store()
        artifact = export_artifact(sessions, store, tenant=LOCAL_TENANT, job_id=job_id, fmt=fmt)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(store.path(artifact.uri), target)
        with sessions() as session:
            result = repositories.get_result(session, tenant=LOCAL_TENANT, job_id=job_id)
            exports = (result.metrics.get("exports") or {}) if result is not None else {}
    finally:
        engine.dispose()
    return ExportCheck.from_dict(exports[fmt]) if fmt in exports else None
