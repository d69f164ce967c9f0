"""A small typed client for the bitplan API, for ML platforms and for `bitplan submit|wait|...`.

Answers come back as the service's own response models (`service.schemas`), so a field renamed
on the server breaks here, in one place, instead of in every caller. An error answer raises
`ApiError` with the server's message, which already says what to change. Uploads and downloads
stream, so a multi-GB checkpoint never sits in memory.
"""

from __future__ import annotations

import time
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx

from allocator.job import TERMINAL_STATUSES, JobSpec, JobStatus, UploadKind
from service.schemas import JobOut, LatencyTableOut, ParetoOut, SolveOut, UploadOut

DEFAULT_TIMEOUT = httpx.Timeout(30.0, read=300.0)
"""Reads may wait on a slow validation of a large upload; connecting should never take long."""

UPLOAD_PATHS = {UploadKind.MODEL: "/v1/models", UploadKind.DATASET: "/v1/datasets"}


class ApiError(Exception):
    """An error answer: `status` is the HTTP status, `error` the server's error type."""

    def __init__(self, status: int, detail: str, error: str | None = None) -> None:
        super().__init__(f"{detail} (HTTP {status})")
        self.status = status
        self.detail = detail
        self.error = error


class JobEnded(Exception):
    """`wait` saw the job end without a result: it failed or was cancelled."""

    def __init__(self, job: JobOut) -> None:
        reason = f": {job.error}" if job.error else ""
        super().__init__(f"job {job.id} {job.status.value}{reason}")
        self.job = job


class BitplanClient:
    def __init__(
        self,
        server: str,
        key: str,
        *,
        timeout: httpx.Timeout | float = DEFAULT_TIMEOUT,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self._http = httpx.Client(
            base_url=server.rstrip("/"),
            headers={"Authorization": f"Bearer {key}"},
            timeout=timeout,
            transport=transport,
        )

    def __enter__(self) -> BitplanClient:
        return self

    def __exit__(
        self,
        _type: type[BaseException] | None,
        _value: BaseException | None,
        _traceback: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def upload_model(self, path: str | Path) -> UploadOut:
        return self.upload(UploadKind.MODEL, path)

    def upload_dataset(self, path: str | Path) -> UploadOut:
        return self.upload(UploadKind.DATASET, path)

    def upload(self, kind: UploadKind, path: str | Path) -> UploadOut:
        """Upload one file; the answer's `ref` is what a job spec names it by."""
        path = Path(path)
        with path.open("rb") as source:
            files = {"file": (path.name, source, "application/octet-stream")}
            return UploadOut.model_validate(self._json("POST", UPLOAD_PATHS[kind], files=files))

    def submit(
        self,
        spec: JobSpec,
        *,
        queue: str | None = None,
        priority: int = 0,
        not_before: str | None = None,
        callback_url: str | None = None,
        idempotency_key: str | None = None,
    ) -> JobOut:
        """Queue a job whose files are already `upload:<id>` refs (or server paths)."""
        body: dict[str, Any] = {"spec": spec.to_dict(), "priority": priority}
        optional = {"queue": queue, "not_before": not_before, "callback_url": callback_url}
        body.update({name: value for name, value in optional.items() if value is not None})
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return JobOut.model_validate(self._json("POST", "/v1/jobs", json=body, headers=headers))

    def status(self, job_id: str) -> JobOut:
        return JobOut.model_validate(self._json("GET", f"/v1/jobs/{job_id}"))

    def cancel(self, job_id: str) -> JobOut:
        return JobOut.model_validate(self._json("POST", f"/v1/jobs/{job_id}/cancel"))

    def wait(self, job_id: str, *, poll: float = 1.0, timeout: float | None = None) -> JobOut:
        """Poll until the job ends; its final state (raises TimeoutError past `timeout`)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while (job := self.status(job_id)).status not in TERMINAL_STATUSES:
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {job.status.value} after {timeout} s")
            time.sleep(poll)
        return job

    def result(self, job_id: str) -> dict[str, Any]:
        """The object `bitplan run --json` prints for the job."""
        return self._json("GET", f"/v1/jobs/{job_id}/result")

    def wait_result(self, job_id: str, *, poll: float = 1.0) -> dict[str, Any]:
        """The result once the job has succeeded; raises JobEnded if it failed or was cancelled."""
        job = self.wait(job_id, poll=poll)
        if job.status is not JobStatus.SUCCEEDED:
            raise JobEnded(job)
        return self.result(job_id)

    def fetch(self, job_id: str, name: str, path: str | Path) -> Path:
        """Download one artifact to `path`, streamed; a failed download leaves no file."""
        path = Path(path)
        partial = path.with_name(f".{path.name}.partial")
        try:
            with self._http.stream("GET", f"/v1/jobs/{job_id}/artifacts/{name}") as response:
                _raise_for_error(response)
                path.parent.mkdir(parents=True, exist_ok=True)
                with partial.open("wb") as target:
                    for chunk in response.iter_bytes():
                        target.write(chunk)
            partial.replace(path)
        finally:
            partial.unlink(missing_ok=True)
        return path

    def export(self, job_id: str, path: str | Path, fmt: str = "onnx") -> Path:
        """Download the job's model in a runtime format (`fmt`: "onnx"), streamed to `path`.

        A job that did not export it as it ran exports it now and checks it in ONNX Runtime
        (seconds to minutes; the read timeout covers it); a refusal or a failed check is an
        `ApiError` (422) whose detail names the quantizer or the first diverging layer. The
        check's figures are then in `result(job_id)["metrics"]["exports"]`."""
        return self.fetch(job_id, fmt, path)

    def request_latency_table(
        self, request: dict[str, Any], *, queue: str = "latency"
    ) -> LatencyTableOut:
        """Have a latency table measured on the machines serving `queue` (the target's
        workers): `request` names `model`, `weights` (an `upload:<id>` ref or a server path),
        `input_shape` ("1,3,32,32"), `runtime`, and optionally `bits`, `act_bits`, `warmup`,
        `repeats`, `force`. Poll `latency_table(id)` or call `wait_latency_table`."""
        body = {**request, "queue": queue}
        return LatencyTableOut.model_validate(self._json("POST", "/v1/latency-tables", json=body))

    def latency_table(self, table_id: str) -> LatencyTableOut:
        return LatencyTableOut.model_validate(self._json("GET", f"/v1/latency-tables/{table_id}"))

    def latency_tables(self) -> list[LatencyTableOut]:
        return [
            LatencyTableOut.model_validate(row) for row in self._json("GET", "/v1/latency-tables")
        ]

    def wait_latency_table(
        self, table_id: str, *, poll: float = 1.0, timeout: float | None = None
    ) -> LatencyTableOut:
        """Poll until the table is measured or its request failed (TimeoutError past
        `timeout`); its `table` is the one a job names by this id in `latency_table`."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while (found := self.latency_table(table_id)).status in ("queued", "running"):
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"latency table {table_id} still {found.status}")
            time.sleep(poll)
        return found

    def solve_profile(
        self, profile_id: str, budget: str, *, time_limit: float | None = None
    ) -> SolveOut:
        body = {"budget": budget, "time_limit": time_limit}
        return SolveOut.model_validate(
            self._json("POST", f"/v1/profiles/{profile_id}/solve", json=body)
        )

    def pareto_profile(self, profile_id: str, budgets: list[str]) -> ParetoOut:
        body = {"budgets": budgets}
        return ParetoOut.model_validate(
            self._json("POST", f"/v1/profiles/{profile_id}/pareto", json=body)
        )

    def _json(self, method: str, url: str, **kwargs: Any) -> Any:
        response = self._http.request(method, url, **kwargs)
        _raise_for_error(response)
        return response.json()


def _raise_for_error(response: httpx.Response) -> None:
    if response.is_success:
        return
    response.read()
    try:
        body = response.json()
    except ValueError:
        raise ApiError(response.status_code, response.text or response.reason_phrase) from None
    detail = body.get("detail") if isinstance(body, dict) else None
    error = body.get("error") if isinstance(body, dict) else None
    raise ApiError(response.status_code, str(detail or body), error)
