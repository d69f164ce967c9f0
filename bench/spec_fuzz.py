"""Fuzzed job specs: each field drawn (seeded) from hostile literals and sent as raw JSON, so
NaN, Infinity, huge integers and lone surrogates reach the server's parser as a client could
send them. Every answer must be a refusal, never a 5xx or a dropped connection.

Imports httpx; never tests.
"""

from __future__ import annotations

import random
import sys
import time
from collections import Counter

import httpx

from bench.attacks import LATER, Target

HOSTILE_NUMBERS = (
    "NaN",
    "Infinity",
    "-Infinity",
    "1e308",
    "-1e308",
    "-1",
    "0",
    "1e400",
    "9223372036854775808",
    "-9223372036854775809",
    "2.5",
    "true",
    "null",
)
HOSTILE_TEXT = (
    '"../../etc/passwd"',
    '"/etc/shadow"',
    '"\\u0000"',
    '"' + "x" * 5000 + '"',
    '"timm:resnet18?checkpoint_path=/etc/passwd"',
    '"upload:../../x"',
    '""',
    '"\\ud800"',
    "{}",
    "[]",
    "[[[]]]",
)
FIELDS = (
    "model",
    "calib",
    "weights",
    "eval",
    "budget",
    "method",
    "bits",
    "calib_samples",
    "batch_size",
    "eval_samples",
    "pins",
    "time_limit",
    "seed",
    "act_bits",
    "act_quantizers",
    "pin_first_last",
    "report",
)


def fuzz(target: Target, count: int, seed: int) -> Counter[int | str]:
    """`count` specs, each with 1-4 fields set to a hostile literal, sent as raw JSON (NaN and
    Infinity included, which `json` writes and Python servers read). Uses the other tenant:
    the first one's job quota is full."""
    rng = random.Random(seed)
    statuses: Counter[int | str] = Counter()
    pool = HOSTILE_NUMBERS + HOSTILE_TEXT
    base = {"model": '"zoo:cifar_resnet20"', "calib": '"/nonexistent.npz"'}
    with httpx.Client(base_url=target.url, headers=target.other, timeout=60) as client:
        for index in range(count):
            fields = dict(base)
            for name in rng.sample(FIELDS, rng.randint(1, 4)):
                fields[name] = rng.choice(pool)
            spec = ", ".join(f'"{name}": {value}' for name, value in fields.items())
            body = f'{{"spec": {{{spec}}}, "not_before": "{LATER}"}}'
            statuses[_send(client, body)] += 1
            if index % 50 == 49:
                print(f"fuzzed {index + 1}/{count}", file=sys.stderr)
    return statuses


def _send(client: httpx.Client, body: str) -> int | str:
    """The status, after waiting out 429s as told; a dropped connection is counted as a server
    error under its exception's name."""
    for _attempt in range(5):
        try:
            response = client.post(
                "/v1/jobs", content=body, headers={"Content-Type": "application/json"}
            )
        except httpx.TransportError as error:
            print(f"{type(error).__name__} on {body[:300]}", file=sys.stderr)
            return type(error).__name__
        if response.status_code != 429:
            break
        time.sleep(float(response.headers.get("Retry-After", "1")))
    if response.status_code >= 500:
        print(f"{response.status_code} on {body[:300]}", file=sys.stderr)
    return response.status_code
