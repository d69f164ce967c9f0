"""The per-process cache of verified API keys."""

from __future__ import annotations

import time

from service.auth import KeyCache


def test_a_remembered_key_expires_after_its_ttl() -> None:
    cache = KeyCache(ttl=0.05)
    cache.put("bp_a_secret", "acme")
    assert cache.get("bp_a_secret") == "acme"
    assert cache.get("bp_a_other") is None
    time.sleep(0.06)
    assert cache.get("bp_a_secret") is None


def test_the_least_recently_used_key_leaves_first() -> None:
    cache = KeyCache(ttl=60, size=2)
    cache.put("k1", "t1")
    cache.put("k2", "t2")
    assert cache.get("k1") == "t1"
    cache.put("k3", "t3")
    assert cache.get("k2") is None
    assert (cache.get("k1"), cache.get("k3")) == ("t1", "t3")


def test_a_zero_ttl_remembers_nothing() -> None:
    cache = KeyCache(ttl=0)
    cache.put("k", "t")
    assert cache.get("k") is None


def test_only_a_digest_of_the_key_is_kept() -> None:
    cache = KeyCache(ttl=60)
    cache.put("bp_abc_supersecret", "acme")
    assert all("supersecret" not in digest for digest in cache._entries)
