"""Job callbacks over the HTTP API: signed and retried, refused toward anything but public
addresses (at submit and again at delivery), and bounded per attempt and per tenant, so that
neither a tenant's URL nor its slow receiver can be turned against the server or other tenants.

Receivers run on loopback, which the default policy refuses; tests that must reach them allow
127.0.0.0/8 through `webhook_allowed_networks`, as an operator would for an internal receiver.
"""

from __future__ import annotations

import itertools
import json
import select
import socket
import socketserver
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from ipaddress import ip_address
from typing import Any

import pytest
from fastapi.testclient import TestClient

from service import webhooks
from service.settings import Settings
from service.webhooks import SIGNATURE_HEADER, TIMESTAMP_HEADER, IPAddress, verify
from tests.api_app import WEBHOOK_SECRET, job_body, npz_bytes, upload

LOOPBACK_ALLOWED = {"webhook_allowed_networks": ["127.0.0.0/8"]}
PUBLIC_ADDRESS = ip_address("93.184.215.14")
TRICKLE_SECONDS = 0.5
DEADLINE = 1.0


@pytest.fixture
def webhook_settings() -> dict[str, Any]:
    """Webhook settings of one test, given through `parametrize`; the defaults otherwise."""
    return {}


@pytest.fixture
def settings(settings: Settings, webhook_settings: dict[str, Any]) -> Settings:
    return settings.model_copy(update=webhook_settings)


class Receiver(ThreadingHTTPServer):
    """A callback receiver on a free loopback port that answers 503 `failures` times, then 204,
    recording each call's headers and body; also used by the Celery worker's integration test."""

    def __init__(self, failures: int = 0) -> None:
        super().__init__(("127.0.0.1", 0), _ReceiverHandler)
        self.failures_left = failures
        self.calls: list[tuple[dict[str, str], bytes]] = []
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def url(self, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.server_port}/hook"

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


class _ReceiverHandler(BaseHTTPRequestHandler):
    server: Receiver

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.server.calls.append((dict(self.headers), body))
        if self.server.failures_left:
            self.server.failures_left -= 1
            self.send_response(503)
        else:
            self.send_response(204)
        self.end_headers()

    def log_message(self, *_args: object) -> None:
        return None


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver()
    yield server
    server.stop()


def callback_job(client: TestClient, headers: dict[str, str], calib: str, url: str) -> str:
    """Submit a queued job with `url` as its callback and cancel it, which ends it at once."""
    job = client.post("/v1/jobs", headers=headers, json={**job_body(calib), "callback_url": url})
    assert job.status_code == 202, job.text
    job_id: str = job.json()["id"]
    assert client.post(f"/v1/jobs/{job_id}/cancel", headers=headers).status_code == 202
    return job_id


@pytest.fixture
def end_with_callback(
    client: TestClient, acme: dict[str, str], calib_ref: str
) -> Callable[[str], str]:
    """Ends a job with a callback URL, then waits for its delivery (by closing the notifier, which
    waits for deliveries in flight); returns the job's id."""

    def end(url: str) -> str:
        job_id = callback_job(client, acme, calib_ref, url)
        client.app.state.notifier.close()
        return job_id

    return end


def refusal(client: TestClient, headers: dict[str, str], calib: str, url: str) -> str:
    """The detail of the 422 that refuses a job with callback `url`; nothing is queued."""
    body = {**job_body(calib), "callback_url": url}
    response = client.post("/v1/jobs", headers=headers, json=body)
    assert response.status_code == 422, response.text
    assert client.get("/v1/jobs", headers=headers).json()["jobs"] == []
    detail: str = response.json()["detail"]
    return detail


def wait_until(condition: Callable[[], bool], timeout: float) -> float:
    """Seconds until `condition` held; fails past `timeout`."""
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < timeout, f"not within {timeout} s"
        time.sleep(0.01)
    return time.monotonic() - started


@pytest.mark.parametrize("webhook_settings", [LOOPBACK_ALLOWED], ids=["loopback-allowed"])
def test_webhook_is_signed_and_retried(
    end_with_callback: Callable[[str], str], receiver: Receiver
) -> None:
    receiver.failures_left = 1
    job_id = end_with_callback(receiver.url())
    assert len(receiver.calls) == 2, "the first answer was 503, so the call is retried once"
    headers, body = receiver.calls[-1]
    assert verify(WEBHOOK_SECRET, headers[TIMESTAMP_HEADER], body, headers[SIGNATURE_HEADER])
    assert not verify("wrong", headers[TIMESTAMP_HEADER], body, headers[SIGNATURE_HEADER])
    assert headers["Host"] == f"127.0.0.1:{receiver.server_port}"
    event = json.loads(body)
    assert event["event"] == "job.finished"
    assert (event["job"]["id"], event["job"]["status"]) == (job_id, "cancelled")


@pytest.mark.parametrize(
    ("url", "kind"),
    [
        ("http://127.0.0.1:6379/", "loopback"),
        ("http://localhost:8000/v1/jobs", "loopback"),
        ("http://10.0.0.1/", "private"),
        ("http://169.254.169.254/latest/meta-data", "link-local"),
        ("http://[::1]/", "loopback"),
        ("http://[::ffff:127.0.0.1]/", "loopback"),
        ("http://100.64.0.1/", "shared (CGNAT)"),
        ("http://0.0.0.0/", "unspecified"),
    ],
)
def test_callbacks_to_internal_addresses_are_refused_by_default(
    client: TestClient, acme: dict[str, str], calib_ref: str, url: str, kind: str
) -> None:
    detail = refusal(client, acme, calib_ref, url)
    assert f"a {kind} address, and callbacks to {kind} addresses are not allowed" in detail
    assert "BITPLAN_WEBHOOK_ALLOWED_NETWORKS" in detail


def test_a_callback_host_that_does_not_resolve_is_refused(
    client: TestClient, acme: dict[str, str], calib_ref: str
) -> None:
    detail = refusal(client, acme, calib_ref, "https://no-such-host.invalid/hook")
    assert "'no-such-host.invalid' does not resolve" in detail


@pytest.mark.parametrize(
    "webhook_settings", [{"webhook_allowed_hosts": ["hooks.example.com"]}], ids=["hosts-listed"]
)
def test_a_host_allow_list_limits_callbacks_to_its_names(
    client: TestClient, acme: dict[str, str], calib_ref: str
) -> None:
    detail = refusal(client, acme, calib_ref, "https://example.org/hook")
    assert "BITPLAN_WEBHOOK_ALLOWED_HOSTS" in detail


class FakeDNS:
    """Stands in for `webhooks.resolve`: gives `answers` in turn, the last one from then on, and
    records the names asked."""

    def __init__(self) -> None:
        self.answers: list[list[IPAddress]] = [[ip_address("127.0.0.1")]]
        self.asked: list[str] = []

    def __call__(self, host: str, port: int) -> list[IPAddress]:
        self.asked.append(host)
        return self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]


@pytest.fixture
def dns(monkeypatch: pytest.MonkeyPatch) -> FakeDNS:
    fake = FakeDNS()
    monkeypatch.setattr(webhooks, "resolve", fake)
    return fake


def test_a_name_rebound_to_loopback_after_submit_is_not_called(
    end_with_callback: Callable[[str], str], receiver: Receiver, dns: FakeDNS
) -> None:
    """DNS rebinding: public when checked at submit, loopback by delivery. `localhost` really
    resolves to loopback, so a delivery that connected by name would reach the receiver too."""
    dns.answers = [[PUBLIC_ADDRESS], [ip_address("127.0.0.1")]]
    end_with_callback(receiver.url("localhost"))
    assert dns.asked == ["localhost", "localhost"], "resolved at submit and again at delivery"
    assert receiver.calls == []


@pytest.mark.parametrize("webhook_settings", [LOOPBACK_ALLOWED], ids=["loopback-allowed"])
def test_a_delivery_connects_to_the_address_it_checked(
    end_with_callback: Callable[[str], str], receiver: Receiver, dns: FakeDNS
) -> None:
    """A name only the fake resolver knows: the call arrives only if the connection goes to
    the checked address rather than asking DNS again, and carries the name as its Host."""
    end_with_callback(receiver.url("receiver.invalid"))
    assert [headers["Host"] for headers, _ in receiver.calls] == [
        f"receiver.invalid:{receiver.server_port}"
    ]


class Trickler(socketserver.ThreadingTCPServer):
    """A receiver that reads the request, then answers one byte every TRICKLE_SECONDS until the
    caller hangs up: no single read ever waits long, so only a total deadline ends the call.
    Records how long each connection lasted and how many were open at once."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _TrickleHandler)
        self.lock = threading.Lock()
        self.open = 0
        self.most_open = 0
        self.durations: list[float] = []
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def opened(self) -> None:
        with self.lock:
            self.open += 1
            self.most_open = max(self.most_open, self.open)

    def closed(self, seconds: float) -> None:
        with self.lock:
            self.open -= 1
            self.durations.append(seconds)


class _TrickleHandler(socketserver.BaseRequestHandler):
    server: Trickler
    request: socket.socket

    def handle(self) -> None:
        started = time.monotonic()
        self.server.opened()
        try:
            self._read_request()
            # A status line, then one header that never ends.
            for byte in itertools.chain(b"HTTP/1.1 200 OK\r\nX-Trickle: ", itertools.repeat(97)):
                self.request.sendall(bytes([byte]))
                readable, _, _ = select.select([self.request], [], [], TRICKLE_SECONDS)
                if readable and not self.request.recv(1):
                    break  # the caller hung up
        except OSError:
            pass  # the caller reset the connection
        self.server.closed(time.monotonic() - started)

    def _read_request(self) -> None:
        received = b""
        while b"\r\n\r\n" not in received:
            received += self.request.recv(4096)
        head, _, body = received.partition(b"\r\n\r\n")
        length = next(
            int(line.split(b":")[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        )
        while len(body) < length:
            body += self.request.recv(4096)


@pytest.mark.parametrize(
    "webhook_settings",
    [{**LOOPBACK_ALLOWED, "webhook_timeout_seconds": DEADLINE, "webhook_attempts": 1}],
    ids=["one-second-deadline"],
)
def test_a_trickling_receiver_is_cut_at_the_deadline_and_delays_no_other_tenant(
    client: TestClient,
    settings: Settings,
    acme: dict[str, str],
    globex: dict[str, str],
    calib_ref: str,
    receiver: Receiver,
) -> None:
    trickler = Trickler()
    per_tenant = settings.webhook_concurrency_per_tenant
    trickled = per_tenant + 1
    globex_calib = upload(client, globex, "datasets", "calib.npz", npz_bytes()).json()["ref"]
    for _ in range(trickled):
        callback_job(client, acme, calib_ref, f"http://127.0.0.1:{trickler.server_address[1]}/")
    wait_until(lambda: trickler.open == per_tenant, timeout=DEADLINE / 2)

    callback_job(client, globex, globex_calib, receiver.url())
    other_tenant_seconds = wait_until(lambda: bool(receiver.calls), timeout=DEADLINE)
    assert trickler.durations == [], "the other tenant's callback waited for the trickling ones"

    wait_until(lambda: len(trickler.durations) == trickled, timeout=3 * DEADLINE + 1)
    trickler.shutdown()
    trickler.server_close()
    print(
        f"other tenant's callback after {other_tenant_seconds:.2f} s; trickling calls cut after "
        f"{', '.join(f'{seconds:.2f}' for seconds in trickler.durations)} s"
    )
    assert max(trickler.durations) < DEADLINE + TRICKLE_SECONDS + 0.3
    assert trickler.most_open == per_tenant
