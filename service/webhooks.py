"""Telling a caller that its job ended: a signed POST to the job's callback URL, retried.

The receiver must be able to trust the call without calling back, so the body is signed with
HMAC-SHA256 under the operator's shared secret, over the timestamp and the exact body bytes
(`X-Bitplan-Signature: sha256=<hex>`, `X-Bitplan-Timestamp: <unix seconds>`); including the
timestamp lets a receiver refuse replays. Callback hosts are limited to an allow-list, because a
URL a tenant chooses is a request the server makes on its behalf.

Never imports FastAPI: delivery runs wherever a job ends, not only in the API process.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any
from urllib.parse import urlsplit

import httpx
from sqlalchemy.orm import Session, sessionmaker

from db import repositories
from db.models import TERMINAL_STATUSES, Job
from service.errors import BadReference
from service.schemas import JobOut, WebhookEvent
from service.settings import Settings

SIGNATURE_HEADER = "X-Bitplan-Signature"
TIMESTAMP_HEADER = "X-Bitplan-Timestamp"
SIGNATURE_SCHEME = "sha256="

log = logging.getLogger(__name__)


def sign(secret: str, timestamp: str, body: bytes) -> str:
    digest = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return SIGNATURE_SCHEME + digest.hexdigest()


def verify(secret: str, timestamp: str, body: bytes, signature: str) -> bool:
    """What a receiver runs; constant-time, so the comparison leaks nothing about the secret."""
    return hmac.compare_digest(sign(secret, timestamp, body), signature)


def check_callback_url(url: str, settings: Settings) -> None:
    """Refuse a callback the server must not call, or could not sign; an empty allow-list
    allows every host."""
    if not settings.webhook_secret.get_secret_value():
        raise BadReference(
            "this server has no webhook secret (BITPLAN_WEBHOOK_SECRET), so it cannot sign "
            "callbacks; poll the job instead, or ask the operator to set one"
        )
    allowed = settings.webhook_allowed_hosts
    host = urlsplit(url).hostname or ""
    if allowed and host not in allowed:
        raise BadReference(
            f"callback host {host!r} is not allowed; use one of {', '.join(allowed)} "
            "or ask the operator to add it to BITPLAN_WEBHOOK_ALLOWED_HOSTS"
        )


class WebhookSender:
    """POSTs one JSON body until the receiver answers 2xx or the attempts are spent.

    A 4xx other than 408 and 429 means the receiver rejected this body, and sending it again
    would be rejected again, so it stops there; timeouts, connection errors and 5xx back off
    exponentially (`backoff`, 2x, 4x, ...).
    """

    def __init__(
        self,
        secret: str,
        *,
        attempts: int,
        backoff: float,
        timeout: float,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.secret = secret
        self.attempts = attempts
        self.backoff = backoff
        self.timeout = timeout
        self.sleep = sleep

    def send(self, url: str, payload: dict[str, Any]) -> bool:
        body = json.dumps(payload, separators=(",", ":"), default=str).encode()
        with httpx.Client(timeout=self.timeout, follow_redirects=False) as client:
            for attempt in range(self.attempts):
                if attempt:
                    self.sleep(self.backoff * 2 ** (attempt - 1))
                outcome = self._post(client, url, body)
                if outcome is not None:
                    return outcome
        log.warning("webhook %s not delivered after %d attempts", url, self.attempts)
        return False

    def _post(self, client: httpx.Client, url: str, body: bytes) -> bool | None:
        """True delivered, False rejected for good, None worth another try."""
        timestamp = str(int(time.time()))
        headers = {
            "Content-Type": "application/json",
            TIMESTAMP_HEADER: timestamp,
            SIGNATURE_HEADER: sign(self.secret, timestamp, body),
        }
        try:
            response = client.post(url, content=body, headers=headers)
        except httpx.HTTPError as error:
            log.info("webhook %s failed: %s", url, error)
            return None
        if response.is_success:
            return True
        if response.status_code in (408, 429) or response.is_server_error:
            return None
        log.warning("webhook %s rejected with %d", url, response.status_code)
        return False


class JobNotifier:
    """Sends the `job.finished` event of an ended job that has a callback URL, from background
    threads, so neither a request nor a worker waits for a slow receiver.

    `notify` takes any copy of the job row (a worker's is stale by the time the job ends) and
    reads the job again before sending, so the event carries its final state.
    """

    def __init__(
        self, sender: WebhookSender, sessions: sessionmaker[Session], threads: int = 2
    ) -> None:
        self.sender = sender
        self.sessions = sessions
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="bitplan-webhook")

    @classmethod
    def from_settings(cls, settings: Settings, sessions: sessionmaker[Session]) -> JobNotifier:
        sender = WebhookSender(
            settings.webhook_secret.get_secret_value(),
            attempts=settings.webhook_attempts,
            backoff=settings.webhook_backoff_seconds,
            timeout=settings.webhook_timeout_seconds,
        )
        return cls(sender, sessions)

    def notify(self, job: Job) -> Future[bool] | None:
        """Queue the delivery; None when the job has no callback URL."""
        if job.callback_url is None:
            return None
        return self._pool.submit(self._deliver, job.tenant, job.id, job.callback_url)

    def notify_ended(self, job_id: str) -> Future[bool] | None:
        """The executors' end-of-job hook, which only knows the job id."""
        with self.sessions() as session:
            job = repositories.job_by_id(session, job_id=job_id)
        return None if job is None else self.notify(job)

    def close(self) -> None:
        """Wait for deliveries in flight: a shutdown must not drop a notification halfway."""
        self._pool.shutdown(wait=True)

    def _deliver(self, tenant: str, job_id: str, url: str) -> bool:
        with self.sessions() as session:
            job = repositories.get_job(session, tenant=tenant, job_id=job_id)
        if job is None or job.status not in TERMINAL_STATUSES:
            return False
        return self.sender.send(url, WebhookEvent(job=JobOut.of(job)).model_dump(mode="json"))
