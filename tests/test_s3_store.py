"""The S3-compatible artifact store against a real S3 server (moto's server mode, over HTTP).

Two `S3Store`s with separate cache folders stand for two machines that share only the bucket.
What is checked: the same `cas://` URIs as the folder store, objects keyed
`<prefix>/sha256/<hex>`, content stored once (a second write of it uploads nothing), multipart
uploads of files above the part size, a missing object and a crafted URI refused, a cached copy
that was changed fetched again, a damaged object never handed out, and errors that name no
bucket, endpoint or credential, up to the API's answers.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from db.s3_store import PART_BYTES, S3Store
from db.store import (
    FolderStore,
    StoreConfig,
    StoreUnavailable,
    UnknownObject,
    open_store,
    sha256_uri,
)
from service.app import create_app
from service.settings import Settings
from tests.api_app import key_for, npz_bytes, upload
from tests.s3_server import SECRET_KEY, Bucket


def s3_store(bucket: Bucket, cache: Path) -> S3Store:
    store = open_store(StoreConfig(bucket.url, bucket.endpoint), home=cache)
    assert isinstance(store, S3Store)
    return store


def count_calls(store: S3Store, *operations: str) -> list[str]:
    """The names of the S3 operations `store` sends from now on, among `operations`."""
    calls: list[str] = []
    for operation in operations:
        store._client.meta.events.register(
            f"before-call.s3.{operation}", lambda op=operation, **_: calls.append(op)
        )
    return calls


def test_round_trip_between_two_machines(s3_bucket: Bucket, tmp_path: Path) -> None:
    writer = s3_store(s3_bucket, tmp_path / "api")
    reader = s3_store(s3_bucket, tmp_path / "worker")
    data = b"weights" * 1000

    stored = writer.put_bytes(data)

    sha256 = hashlib.sha256(data).hexdigest()
    assert stored == (sha256, len(data), sha256_uri(sha256))
    assert s3_bucket.keys() == [f"artifacts/sha256/{sha256}"]
    with reader.open(stored.uri) as stream:
        assert stream.read() == data
    path = reader.path(stored.uri)
    assert path.read_bytes() == data
    assert path.is_relative_to(tmp_path / "worker" / "store-cache")
    assert reader.path(stored.uri) == path  # cached: the second call downloads nothing


def test_large_files_go_up_in_parts_and_come_back_whole(s3_bucket: Bucket, tmp_path: Path) -> None:
    data = bytes(range(256)) * (PART_BYTES // 256 + 4099)
    source = tmp_path / "model.safetensors"
    source.write_bytes(data)
    writer = s3_store(s3_bucket, tmp_path / "api")
    calls = count_calls(writer, "CreateMultipartUpload", "UploadPart", "PutObject")

    stored = writer.put_file(source)

    assert calls.count("CreateMultipartUpload") == 1 and calls.count("UploadPart") == 2
    assert stored.sha256 == hashlib.sha256(data).hexdigest() and stored.size == len(data)
    reader = s3_store(s3_bucket, tmp_path / "worker")
    assert reader.path(stored.uri).read_bytes() == data


def test_content_is_stored_once(s3_bucket: Bucket, tmp_path: Path) -> None:
    first = s3_store(s3_bucket, tmp_path / "one")
    second = s3_store(s3_bucket, tmp_path / "two")  # its cache is empty: only the bucket knows
    uploads = count_calls(second, "PutObject", "CreateMultipartUpload")

    uris = {first.put_bytes(b"report").uri, second.put_bytes(b"report").uri}

    assert len(uris) == 1
    assert uploads == []
    assert len(s3_bucket.keys()) == 1


def test_an_object_missing_from_the_bucket_is_unknown(s3_bucket: Bucket, tmp_path: Path) -> None:
    store = s3_store(s3_bucket, tmp_path)
    missing = sha256_uri("0" * 64)

    for read in (store.path, store.open):
        with pytest.raises(UnknownObject) as raised:
            read(missing)
        assert s3_bucket.name not in str(raised.value)
    assert not list((tmp_path / "store-cache").rglob("0" * 64))


def test_crafted_uris_are_refused_before_any_request(s3_bucket: Bucket, tmp_path: Path) -> None:
    store = s3_store(s3_bucket, tmp_path)
    stored = store.put_bytes(b"secret of another prefix")
    requests = count_calls(store, "GetObject", "HeadObject")
    crafted = (
        "cas://sha256/../../etc/passwd",
        f"cas://sha256/{stored.sha256}/../x",
        f"cas://sha256/{stored.sha256.upper()}",
        f"s3://{s3_bucket.name}/artifacts/sha256/{stored.sha256}",
        f"file:///{tmp_path}/store-cache",
    )

    for uri in crafted:
        for read in (store.path, store.open):
            with pytest.raises(UnknownObject):
                read(uri)
    assert requests == []


@pytest.mark.parametrize(
    "damage",
    [
        lambda path: path.write_bytes(b"truncated"),
        lambda path: path.write_bytes(b"X" * path.stat().st_size),  # same size, other bytes
    ],
    ids=["truncated", "overwritten"],
)
def test_a_changed_cached_copy_is_fetched_again(
    s3_bucket: Bucket, tmp_path: Path, damage: Callable[[Path], Any]
) -> None:
    data = b"packed weights" * 100
    stored = s3_store(s3_bucket, tmp_path / "api").put_bytes(data)
    reader = s3_store(s3_bucket, tmp_path / "worker")
    cached = reader.path(stored.uri)
    damage(cached)
    downloads = count_calls(reader, "GetObject")

    assert reader.path(stored.uri).read_bytes() == data
    with reader.open(stored.uri) as stream:
        assert stream.read() == data
    assert downloads == ["GetObject"]


def test_a_damaged_object_is_never_handed_out(s3_bucket: Bucket, tmp_path: Path) -> None:
    sha256 = hashlib.sha256(b"the real bytes").hexdigest()
    s3_bucket.client().put_object(
        Bucket=s3_bucket.name, Key=f"artifacts/sha256/{sha256}", Body=b"other bytes"
    )
    store = s3_store(s3_bucket, tmp_path)

    with pytest.raises(StoreUnavailable, match="do not match their name"):
        store.path(sha256_uri(sha256))
    with pytest.raises(StoreUnavailable), store.open(sha256_uri(sha256)) as stream:
        stream.read()
    assert [path for path in (tmp_path / "store-cache").rglob("*") if path.is_file()] == []

    # Writing the real bytes again replaces the damaged object.
    assert store.put_bytes(b"the real bytes").sha256 == sha256
    assert s3_store(s3_bucket, tmp_path / "other").path(sha256_uri(sha256)).read_bytes() == (
        b"the real bytes"
    )


def test_an_unreachable_store_names_nothing_of_the_deployment(tmp_path: Path) -> None:
    from bench.deploy import free_port

    endpoint = f"http://127.0.0.1:{free_port()}"
    store = s3_store(Bucket(endpoint, "private-bucket-name"), tmp_path)

    for attempt in (
        lambda: store.put_bytes(b"x"),
        lambda: store.path(sha256_uri("1" * 64)),
        store.check,
    ):
        with pytest.raises(StoreUnavailable) as raised:
            attempt()
        text = str(raised.value)
        assert "unavailable" in text
        for secret in ("private-bucket-name", endpoint, SECRET_KEY, str(tmp_path)):
            assert secret not in text


def test_check_reports_a_missing_bucket(s3_bucket: Bucket, tmp_path: Path) -> None:
    s3_store(s3_bucket, tmp_path).check()
    missing = Bucket(s3_bucket.endpoint, "no-such-bucket-here")
    with pytest.raises(StoreUnavailable, match="bucket does not exist"):
        s3_store(missing, tmp_path).check()


def test_stream_reads_are_in_chunks(s3_bucket: Bucket, tmp_path: Path) -> None:
    data = bytes(range(256)) * 20_000
    stored = s3_store(s3_bucket, tmp_path / "a").put_stream(io.BytesIO(data))
    with s3_store(s3_bucket, tmp_path / "b").open(stored.uri) as stream:
        parts = iter(lambda: stream.read(65536), b"")
        assert b"".join(parts) == data
    assert not (tmp_path / "b" / "store-cache").exists()  # streamed, nothing written


# --- configuration ---------------------------------------------------------------------------


def test_the_factory_picks_the_backend_from_the_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("BITPLAN_STORE_URL", raising=False)
    folder = open_store(home=tmp_path)
    assert isinstance(folder, FolderStore) and folder.root == tmp_path / "artifacts"

    monkeypatch.setenv("BITPLAN_STORE_URL", "s3://models-bucket/team/bitplan/")
    monkeypatch.setenv("BITPLAN_S3_ENDPOINT_URL", "http://minio:9000")
    settings = Settings(home=tmp_path / "home")
    store = settings.open_store()
    assert isinstance(store, S3Store)
    assert (store.bucket, store.prefix, store.endpoint_url) == (
        "models-bucket",
        "team/bitplan",
        "http://minio:9000",
    )
    assert store.key("ab" * 32) == f"team/bitplan/sha256/{'ab' * 32}"
    assert store.cache.root == tmp_path / "home" / "store-cache"


@pytest.mark.parametrize(
    "url", ["s3://", "s3://UPPER/x", "gs://bucket/x", "s3://bucket/../x y", "/data/artifacts"]
)
def test_a_bad_store_url_fails_at_start_up_naming_the_variable(url: str) -> None:
    with pytest.raises(ValueError, match="BITPLAN_STORE_URL"):
        StoreConfig(url)


# --- through the API ---------------------------------------------------------------------------


def test_uploads_land_in_the_bucket_and_outages_are_503(
    s3_bucket: Bucket, settings: Settings
) -> None:
    settings.store = StoreConfig(s3_bucket.url, s3_bucket.endpoint)
    with TestClient(create_app(settings)) as client:
        acme = key_for(client, "acme")
        created = upload(client, acme, "datasets", "calib.npz", npz_bytes())
        assert created.status_code == 201, created.text
        assert s3_bucket.keys() == [f"artifacts/sha256/{created.json()['sha256']}"]
        assert client.get("/readyz").json()["checks"]["store"] == "ok"

    dead = Bucket("http://127.0.0.1:9", "private-bucket-name")
    settings.store = StoreConfig(dead.url, dead.endpoint)
    with TestClient(create_app(settings)) as client:
        acme = key_for(client, "acme")
        refused = upload(client, acme, "datasets", "calib.npz", npz_bytes(3))
        ready = client.get("/readyz")
    assert refused.status_code == 503
    assert refused.json()["error"] == "StoreUnavailable"
    assert ready.status_code == 503
    for text in (refused.text, ready.text):
        for secret in ("private-bucket-name", "127.0.0.1:9", SECRET_KEY, str(settings.home)):
            assert secret not in text
