"""`bitplan profile-latency`: a latency table (ms per weight layer and choice) measured on this
machine, or on a bitplan server's target machines, and stored under an id jobs name in
`--latency-table`.

Without `--server` the model is timed in this process (`workers.latency.measure_local`) and the
table is stored in the database under `$BITPLAN_HOME`; a table already stored for the same
model content, input shape, runtime, version and machine is reused unless `--force`. With
`--server` the request is queued for the workers serving `--queue` (`POST /v1/latency-tables`)
and the command waits for its table. Heavy modules are imported inside the command.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer
from rich.console import Console

from allocator.latency_table import FLOAT_WIDTH, LATENCY_RUNTIMES, LatencyTable, choice_key
from service.cli.local import LOCAL_TENANT
from service.cli.options import JsonOpt, parse_bits
from service.cli.output import user_errors
from service.cli.remote import remote_errors

SHOWN = ((32, 32), (16, 32), (8, 32), (4, 32), (8, 8), (4, 8), (4, 4))
"""The columns of the printed summary: FP32, float16, INT8 and INT4 weights, with float, 8-bit
and 4-bit activations (the stored table has every measured choice)."""


def profile_latency_command(
    model: Annotated[str, typer.Option(help="timm:<name>, hf:<dir>, zoo:<name>")],
    input_shape: Annotated[
        str, typer.Option(help="the model input's shape, e.g. 1,3,32,32 (images) or 1,128")
    ],
    weights: Annotated[str | None, typer.Option(help=".safetensors or .pth/.th")] = None,
    runtime: Annotated[str, typer.Option(help=" | ".join(LATENCY_RUNTIMES))] = "onnxruntime-cpu",
    bits: Annotated[str, typer.Option(help="weight widths to time")] = "2,3,4,5,6,8,16",
    act_bits: Annotated[str, typer.Option(help="activation widths to time (float always)")] = (
        "4,6,8"
    ),
    warmup: Annotated[int, typer.Option(help="untimed runs first")] = 10,
    repeats: Annotated[int, typer.Option(help="timed runs; the median is kept")] = 50,
    force: Annotated[bool, typer.Option(help="measure even if a table is stored")] = False,
    server: Annotated[
        str | None, typer.Option(envvar="BITPLAN_SERVER", help="measure on a server's workers")
    ] = None,
    key: Annotated[str | None, typer.Option(envvar="BITPLAN_API_KEY")] = None,
    queue: Annotated[str, typer.Option(help="with --server: the target machines' queue")] = (
        "latency"
    ),
    as_json: JsonOpt = False,
) -> None:
    """Time every weight layer at every candidate width on this machine (or a server's target
    machines) and store the table for latency budgets."""
    request: dict[str, Any] = {
        "model": model,
        "weights": weights,
        "input_shape": input_shape,
        "runtime": runtime,
        "warmup": warmup,
        "repeats": repeats,
        "force": force,
    }
    if server:
        with remote_errors():
            request["bits"] = list(parse_bits(bits))
            request["act_bits"] = list(parse_bits(act_bits))
            table, reused = _remote(server, key or "", request, queue), False
    else:
        with user_errors():
            request["bits"] = list(parse_bits(bits))
            request["act_bits"] = list(parse_bits(act_bits))
            table, reused = _local(request)
    if as_json:
        typer.echo(json.dumps({**table.to_dict(), "reused": reused}))
        return
    print_table(table, reused)


def print_table(table: LatencyTable, reused: bool = False) -> None:
    """The table's id and summary, one row per layer at the `SHOWN` choices, and its notes."""
    out = Console(soft_wrap=True)
    out.print(f"latency table {table.table_id}{'  (reused)' if reused else ''}", soft_wrap=True)
    out.print(table.summary(), soft_wrap=True, highlight=False)
    columns = [c for c in SHOWN if any(choice_key(*c) in row for row in table.entries.values())]
    width = max(len(name) for name in table.entries) if table.entries else 5
    header = "  ".join(f"{choice_key(*c):>8}" for c in columns)
    out.print(f"{'ms':<{width}}  {header}", highlight=False)
    for name, row in table.entries.items():
        cells = "  ".join(
            f"{row[choice_key(*c)]:8.4f}" if choice_key(*c) in row else f"{'-':>8}" for c in columns
        )
        out.print(f"{name:<{width}}  {cells}", highlight=False)
    totals = "  ".join(
        f"{sum(row.get(choice_key(*c), 0.0) for row in table.entries.values()):8.4f}"
        for c in columns
    )
    out.print(f"{'sum':<{width}}  {totals}", highlight=False)
    act_rests = "".join(
        f"; rest with every activation at {bits} bits {ms:.4f} ms"
        for bits, ms in sorted(table.act_rest_ms.items())
    )
    out.print(
        f"rest (not in any layer entry) {table.rest_ms:.4f} ms{act_rests}; FP32 predicted "
        f"{table.fp32_ms():.4f} ms; W{FLOAT_WIDTH} is the float layer",
        highlight=False,
    )
    for note in table.notes:
        out.print(f"note: {note}", soft_wrap=True, highlight=False)


def _local(request: dict[str, Any]) -> tuple[LatencyTable, bool]:
    from db.session import init_db, make_session_factory
    from workers.latency import measure_local

    engine = init_db()
    try:
        return measure_local(make_session_factory(engine), tenant=LOCAL_TENANT, request=request)
    finally:
        engine.dispose()


def _remote(server: str, key: str, request: dict[str, Any], queue: str) -> LatencyTable:
    from allocator.errors import BitplanError
    from service.client import BitplanClient

    with BitplanClient(server, key) as client:
        asked = client.request_latency_table(request, queue=queue)
        done = client.wait_latency_table(asked.id)
    if done.table is None:
        raise BitplanError(f"latency table {done.id} {done.status}: {done.error}")
    return LatencyTable.from_dict({**done.table, "table_id": done.id})
