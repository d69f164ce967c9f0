"""Telling a caller that its job ended: a signed POST to the job's callback URL, retried.

The receiver must be able to trust the call without calling back, so the body is signed with
HMAC-SHA256 under the operator's shared secret, over the timestamp and the exact body bytes
(`X-Bitplan-Signature: sha256=<hex>`, `X-Bitplan-Timestamp: <unix seconds>`); including the
timestamp lets a receiver refuse replays.

A URL a tenant chooses is a request the server makes on its behalf, from inside the operator's
network, so a callback may only reach public addresses: loopback, private, link-local (cloud
metadata included), shared (CGNAT), multicast, reserved and unspecified addresses are refused
unless the operator lists their network. The host name is resolved and every address checked
when the job is submitted, and again at each attempt, which then connects to the very address it
checked (with the original `Host` and TLS name): a DNS answer that changes in between (rebinding)
cannot turn a delivery inward. Redirects are never followed.

Deliveries are tasks on one event loop per process: each attempt ends by a total deadline
(connect, send, answer), a tenant has a few attempts in flight at most, and every tenant's
deliveries run beside the others', so a receiver that trickles its answer costs its own tenant one
slot for one deadline and never delays another tenant's webhook.

Never imports FastAPI: delivery runs wherever a job ends, not only in the API process.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import os
import socket
import threading
import time
import weakref
from collections.abc import AsyncIterator, Callable, Coroutine
from concurrent.futures import Future
from contextlib import AbstractAsyncContextManager, asynccontextmanager, nullcontext
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address, ip_network
from typing import Any

import httpx
from sqlalchemy.orm import Session

from allocator.job import TERMINAL_STATUSES
from db import repositories
from db.models import Job
from service.errors import BadReference
from service.schemas import JobOut, WebhookEvent
from service.settings import Settings

SIGNATURE_HEADER = "X-Bitplan-Signature"
TIMESTAMP_HEADER = "X-Bitplan-Timestamp"
SIGNATURE_SCHEME = "sha256="
MAX_DELIVERIES = 64
"""Attempts in flight at once in one process, all tenants together: what a burst of endings may
cost in sockets, while the per-tenant limit keeps any one tenant to a small share of it."""
DEFAULT_PORTS = {"http": 80, "https": 443}

IPAddress = IPv4Address | IPv6Address
IPNetwork = IPv4Network | IPv6Network
Slot = Callable[[], AbstractAsyncContextManager[object]]
"""What an attempt holds while it is in flight: the notifier's per-tenant and global limits."""

_SHARED_ADDRESS_SPACE = ip_network("100.64.0.0/10")
_NON_PUBLIC: tuple[tuple[str, Callable[[IPAddress], bool]], ...] = (
    # The most telling kind first: 169.254.169.254 is link-local and private, ::1 loopback and
    # reserved; the message names the first that applies.
    ("unspecified", lambda address: address.is_unspecified),
    ("loopback", lambda address: address.is_loopback),
    ("link-local", lambda address: address.is_link_local),
    ("multicast", lambda address: address.is_multicast),
    ("private", lambda address: address.is_private),
    ("shared (CGNAT)", lambda address: address in _SHARED_ADDRESS_SPACE),
    ("reserved", lambda address: address.is_reserved),
    ("non-public", lambda address: not address.is_global),
)

log = logging.getLogger(__name__)


def sign(secret: str, timestamp: str, body: bytes) -> str:
    digest = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return SIGNATURE_SCHEME + digest.hexdigest()


def verify(secret: str, timestamp: str, body: bytes, signature: str) -> bool:
    """What a receiver runs; constant-time, so the comparison leaks nothing about the secret."""
    return hmac.compare_digest(sign(secret, timestamp, body), signature)


def resolve(host: str, port: int) -> list[IPAddress]:
    """Every address a connection to `host` may reach, in the resolver's order; `OSError` when
    the name does not resolve. One function, so that submit and delivery (and tests standing in
    for DNS) resolve alike."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(ip_address(info[4][0]) for info in infos))


def non_public_kind(address: IPAddress) -> str | None:
    """Which kind of address a callback must not reach ("loopback", "private", ...), or None for
    a public one. An IPv6 address that carries an IPv4 one (mapped, 6to4, Teredo) reaches that
    IPv4 host, so the carried address is judged too."""
    carried = _carried_ipv4(address)
    if carried is not None:
        kind = non_public_kind(carried)
        mapped = isinstance(address, IPv6Address) and address.ipv4_mapped is not None
        if kind is not None or mapped:  # a mapped address is its IPv4 host, nothing more
            return kind
    return next((kind for kind, applies in _NON_PUBLIC if applies(address)), None)


def _carried_ipv4(address: IPAddress) -> IPv4Address | None:
    if isinstance(address, IPv4Address):
        return None
    return address.ipv4_mapped or address.sixtofour or (address.teredo or (None, None))[1]


class CallbackRefused(BadReference):
    """A callback URL names, or resolves to, a host the server must not call."""


@dataclass(frozen=True)
class CallbackPolicy:
    """Which hosts a callback may reach: any host name unless `allowed_hosts` lists some, and
    only public addresses or those inside `allowed_networks`."""

    allowed_hosts: frozenset[str] = frozenset()
    allowed_networks: tuple[IPNetwork, ...] = ()

    @classmethod
    def from_settings(cls, settings: Settings) -> CallbackPolicy:
        return cls(
            frozenset(host.lower() for host in settings.webhook_allowed_hosts),
            tuple(ip_network(network) for network in settings.webhook_allowed_networks),
        )

    def addresses(self, url: httpx.URL) -> list[IPAddress]:
        """The addresses `url`'s host resolves to, every one of them allowed; `CallbackRefused`
        if any is not (a name with one public and one internal address is refused whole),
        `OSError` when the name does not resolve."""
        host = url.host
        if self.allowed_hosts and host not in self.allowed_hosts:
            raise CallbackRefused(
                f"callback host {host!r} is not allowed; use one of "
                f"{', '.join(sorted(self.allowed_hosts))} or ask the operator to add it to "
                "BITPLAN_WEBHOOK_ALLOWED_HOSTS"
            )
        found = resolve(host, url.port or DEFAULT_PORTS[url.scheme])
        for address in found:
            kind = None if self._listed(address) else non_public_kind(address)
            if kind is not None:
                raise CallbackRefused(
                    f"callback host {host!r} is {address}, a {kind} address, and callbacks to "
                    f"{kind} addresses are not allowed; use a public host, or ask the operator "
                    "to add its network to BITPLAN_WEBHOOK_ALLOWED_NETWORKS"
                )
        return found

    def _listed(self, address: IPAddress) -> bool:
        carried = _carried_ipv4(address)
        return any(
            address in network or (carried is not None and carried in network)
            for network in self.allowed_networks
        )


def check_callback_url(url: str, settings: Settings) -> None:
    """Refuse at submit a callback the server must not call, or could not sign. Each delivery
    checks the address again: a DNS answer may change after this."""
    if not settings.webhook_secret.get_secret_value():
        raise BadReference(
            "this server has no webhook secret (BITPLAN_WEBHOOK_SECRET), so it cannot sign "
            "callbacks; poll the job instead, or ask the operator to set one"
        )
    target = httpx.URL(url)
    try:
        CallbackPolicy.from_settings(settings).addresses(target)
    except OSError as error:
        raise BadReference(
            f"callback host {target.host!r} does not resolve ({error.strerror or error}); "
            "check the URL's host name"
        ) from error


class WebhookSender:
    """POSTs one JSON body until the receiver answers 2xx or the attempts are spent.

    A 4xx other than 408 and 429 means the receiver rejected this body, and sending it again
    would be rejected again, so it stops there; as does a host the policy refuses. Timeouts,
    connection errors and 5xx back off exponentially (`backoff`, 2x, 4x, ...). Each attempt,
    name resolution included, ends after `timeout` seconds however slowly the receiver answers.
    """

    def __init__(
        self,
        secret: str,
        *,
        policy: CallbackPolicy,
        attempts: int,
        backoff: float,
        timeout: float,
    ) -> None:
        self.secret = secret
        self.policy = policy
        self.attempts = attempts
        self.backoff = backoff
        self.timeout = timeout

    @property
    def longest(self) -> float:
        """Seconds one delivery may take once started: every attempt to its deadline, plus the
        waits between them."""
        waits = sum(self.backoff * 2**attempt for attempt in range(self.attempts - 1))
        return self.attempts * self.timeout + waits

    async def send(
        self, client: httpx.AsyncClient, url: str, payload: dict[str, Any], slot: Slot = nullcontext
    ) -> bool:
        """Deliver `payload`, holding `slot` during each attempt (not while backing off)."""
        body = json.dumps(payload, separators=(",", ":"), default=str).encode()
        for attempt in range(self.attempts):
            if attempt:
                await asyncio.sleep(self.backoff * 2 ** (attempt - 1))
            async with slot():
                outcome = await self._attempt(client, httpx.URL(url), body)
            if outcome is not None:
                return outcome
        log.warning("webhook %s not delivered after %d attempts", url, self.attempts)
        return False

    async def _attempt(self, client: httpx.AsyncClient, url: httpx.URL, body: bytes) -> bool | None:
        """True delivered, False refused for good, None worth another try."""
        try:
            async with asyncio.timeout(self.timeout):
                status = await self._post(client, url, body)
        except CallbackRefused as error:
            log.warning("webhook %s not sent: %s", url, error)
            return False
        except TimeoutError:
            log.info("webhook %s: no answer within %.1f s", url, self.timeout)
            return None
        except (OSError, httpx.HTTPError) as error:
            log.info("webhook %s failed: %s", url, error)
            return None
        if 200 <= status < 300:
            return True
        if status in (408, 429) or status >= 500:
            return None
        log.warning("webhook %s rejected with %d", url, status)
        return False

    async def _post(self, client: httpx.AsyncClient, url: httpx.URL, body: bytes) -> int:
        """The status of one POST, sent to an address the policy allowed just now (the first
        that accepts a connection): resolving here and connecting by name would ask DNS again."""
        addresses = await asyncio.to_thread(self.policy.addresses, url)
        timestamp = str(int(time.time()))
        headers = {
            "Host": url.netloc.decode("ascii"),
            "Content-Type": "application/json",
            TIMESTAMP_HEADER: timestamp,
            SIGNATURE_HEADER: sign(self.secret, timestamp, body),
        }
        # TLS verifies the certificate against the name in the URL, not the pinned address.
        extensions = {"sni_hostname": url.host} if url.scheme == "https" else {}
        unreachable: Exception = OSError(f"{url.host} has no address")
        for address in addresses:
            request = client.build_request(
                "POST",
                url.copy_with(host=str(address)),
                content=body,
                headers=headers,
                extensions=extensions,
            )
            try:
                response = await client.send(request, stream=True)
            except httpx.ConnectError as error:
                unreachable = error
                continue
            await response.aclose()  # the status is the answer; the body is never read
            return response.status_code
        raise unreachable


class _Deliveries:
    """One process's delivery machinery: an event loop on a daemon thread, the HTTP client its
    attempts share, and the limits on attempts in flight. A fork copies the object but not the
    thread, so each process builds its own on first use."""

    def __init__(self, per_tenant: int, at_once: int) -> None:
        self.per_tenant = per_tenant
        self.loop = asyncio.new_event_loop()
        # No pooled connections: two host names pinned to one address must never share a TLS
        # connection made for the other. No proxies from the environment: they would connect
        # by name, around the address check. No timeouts of httpx's own: the attempt's total
        # deadline is the only one.
        self.client = httpx.AsyncClient(
            follow_redirects=False,
            trust_env=False,
            timeout=None,
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=0),
        )
        self._everyone = asyncio.Semaphore(at_once)
        self._tenants: dict[str, asyncio.Semaphore] = {}
        self._thread = threading.Thread(
            target=self.loop.run_forever, name="bitplan-webhooks", daemon=True
        )
        self._thread.start()

    def submit(self, delivery: Coroutine[Any, Any, bool]) -> Future[bool]:
        future = asyncio.run_coroutine_threadsafe(delivery, self.loop)
        future.add_done_callback(_log_crash)
        return future

    @asynccontextmanager
    async def slot(self, tenant: str) -> AsyncIterator[None]:
        """Held by one attempt: one of its tenant's slots first, so a tenant waiting on its own
        receivers never takes a global slot from anyone else."""
        mine = self._tenants.setdefault(tenant, asyncio.Semaphore(self.per_tenant))
        async with mine, self._everyone:
            yield

    def close(self, timeout: float) -> None:
        """Wait up to `timeout` seconds for the deliveries submitted so far, cancel the rest,
        stop the loop."""
        asyncio.run_coroutine_threadsafe(self._wind_down(timeout), self.loop).result()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()
        self.loop.close()

    async def _wind_down(self, timeout: float) -> None:
        deliveries = asyncio.all_tasks() - {asyncio.current_task()}
        if deliveries:
            _, late = await asyncio.wait(deliveries, timeout=timeout)
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)
            if late:
                log.warning("%d webhook deliveries unfinished at shutdown were dropped", len(late))
        await self.client.aclose()


def _log_crash(future: Future[bool]) -> None:
    """A delivery that raised (the database unreachable, say) would otherwise vanish unseen:
    callers of `notify` rarely keep its future."""
    if not future.cancelled() and future.exception() is not None:
        log.error("a webhook delivery failed", exc_info=future.exception())


_NOTIFIERS: weakref.WeakSet[JobNotifier] = weakref.WeakSet()


class JobNotifier:
    """Sends the `job.finished` event of an ended job that has a callback URL, in the
    background, so neither a request nor a worker waits for a slow receiver.

    `notify` takes any copy of the job row (a worker's is stale by the time the job ends) and
    reads the job again before sending, so the event carries its final state. Nothing starts
    until the first delivery, in each process: a Celery pool child that inherits this object
    starts its own loop then.
    """

    def __init__(
        self,
        sender: WebhookSender,
        sessions: Callable[[], Session],
        *,
        per_tenant: int = 2,
        at_once: int = MAX_DELIVERIES,
    ) -> None:
        self.sender = sender
        self.sessions = sessions
        self.per_tenant = per_tenant
        self.at_once = at_once
        self._lock = threading.Lock()
        self._deliveries: _Deliveries | None = None
        _NOTIFIERS.add(self)

    @classmethod
    def from_settings(cls, settings: Settings, sessions: Callable[[], Session]) -> JobNotifier:
        sender = WebhookSender(
            settings.webhook_secret.get_secret_value(),
            policy=CallbackPolicy.from_settings(settings),
            attempts=settings.webhook_attempts,
            backoff=settings.webhook_backoff_seconds,
            timeout=settings.webhook_timeout_seconds,
        )
        return cls(sender, sessions, per_tenant=settings.webhook_concurrency_per_tenant)

    def notify(self, job: Job) -> Future[bool] | None:
        """Queue the delivery; None when the job has no callback URL or this process has no
        secret to sign it with (logged: the workers need BITPLAN_WEBHOOK_SECRET too)."""
        if job.callback_url is None:
            return None
        if not self.sender.secret:
            log.warning(
                "job %s: its callback is not sent: this process has no BITPLAN_WEBHOOK_SECRET "
                "to sign it (set the same secret on the API and on every worker)",
                job.id,
            )
            return None
        with self._lock:  # so that `close` waits for every delivery submitted before it
            if self._deliveries is None:
                self._deliveries = _Deliveries(self.per_tenant, self.at_once)
            deliveries = self._deliveries
            return deliveries.submit(
                self._deliver(deliveries, job.tenant, job.id, job.callback_url)
            )

    def notify_ended(self, job_id: str) -> Future[bool] | None:
        """The executors' end-of-job hook, which only knows the job id."""
        with self.sessions() as session:
            job = repositories.job_by_id(session, job_id=job_id)
        return None if job is None else self.notify(job)

    def close(self) -> None:
        """Wait for deliveries in flight (as long as one delivery may take): a shutdown must not
        drop a notification halfway, nor hang on a receiver that never answers."""
        with self._lock:
            deliveries, self._deliveries = self._deliveries, None
        if deliveries is not None:
            deliveries.close(timeout=self.sender.longest)

    def _forget_parents_deliveries(self) -> None:
        """In a forked child: the parent's loop thread did not come along, and its lock may have
        been held by a thread that did not either."""
        self._lock = threading.Lock()
        self._deliveries = None

    async def _deliver(self, deliveries: _Deliveries, tenant: str, job_id: str, url: str) -> bool:
        job = await asyncio.to_thread(self._ended_job, tenant, job_id)
        if job is None:
            return False
        payload = WebhookEvent(job=JobOut.of(job)).model_dump(mode="json")
        return await self.sender.send(
            deliveries.client, url, payload, slot=lambda: deliveries.slot(tenant)
        )

    def _ended_job(self, tenant: str, job_id: str) -> Job | None:
        with self.sessions() as session:
            job = repositories.get_job(session, tenant=tenant, job_id=job_id)
        return job if job is not None and job.status in TERMINAL_STATUSES else None


def _after_fork_in_child() -> None:
    for notifier in list(_NOTIFIERS):
        notifier._forget_parents_deliveries()


os.register_at_fork(after_in_child=_after_fork_in_child)
