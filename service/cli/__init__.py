"""The `bitplan` command line: one job on the embedded default, with progress bars, and the
service (serve it, work for it, talk to it). This file only assembles the commands:

- `options`: the options commands share, the job spec's declared once (`run` and `submit`);
- `output`: user errors (one line, exit 2) and a finished job's summary;
- `local`: `run`, the pipeline in this process, recorded under `$BITPLAN_HOME`;
- `remote`: `submit`, `status`, `wait`, `fetch` against a server (exit 2 refused, 1 the job
  failed or was cancelled, 3 unreachable);
- `export`: `export`, a finished job's model as ONNX, checked in ONNX Runtime (local or remote);
- `latency`: `profile-latency`, a latency table measured on this machine or a server's targets;
- `admin`: `serve`, `worker`, `keys create|list|revoke`.

Each command imports the heavy modules it uses when it runs, so `bitplan run` never loads the
web stack and the remote commands never load torch or SQLAlchemy (tests/test_imports.py).
The console script is `service.cli:app`; `python -m service.cli` runs `main`.
"""

from __future__ import annotations

import logging

import typer

from service.cli import admin, export, latency, local, remote

app = typer.Typer(add_completion=False, help="Mixed-precision bit allocation for PyTorch models.")


@app.callback()
def _group() -> None:
    """Keeps `run` a subcommand even while it is the only one."""


app.command("run")(local.run_command)
app.command("serve")(admin.serve_command)
app.command("worker")(admin.worker_command)
app.command("submit")(remote.submit_command)
app.command("status")(remote.status_command)
app.command("wait")(remote.wait_command)
app.command("fetch")(remote.fetch_command)
app.command("export")(export.export_command)
app.command("profile-latency")(latency.profile_latency_command)
app.add_typer(admin.keys_app, name="keys")


def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    app()
