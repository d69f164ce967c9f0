"""Property-based requests generated from the OpenAPI schema: whatever a client sends, the API
answers with a 2xx or a 4xx, never a 5xx.

Bounded to a few examples per operation so it stays a unit test. The app's lifespan is not run,
so jobs the generator manages to create stay queued instead of starting model passes. The
operations are walked by hand rather than through `schemathesis.pytest.from_fixture`, whose
node-id rewriting does not work with pytest 9.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from db import repositories
from service.app import create_app
from service.settings import Settings

EXAMPLES_PER_OPERATION = 8


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_no_server_errors(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """PostgreSQL refuses what SQLite stores (NUL characters, over-long strings), so both."""
    database_url = request.getfixturevalue("postgres_url") if backend == "postgresql" else None
    api = create_app(Settings(home=tmp_path, database_url=database_url, max_upload_bytes=1 << 20))
    with api.state.session_factory() as session:
        key = repositories.create_api_key(session, tenant="fuzz")
    auth = {"Authorization": f"Bearer {key}"}
    schema = schemathesis.openapi.from_asgi("/openapi.json", api)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 15

    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(
            max_examples=EXAMPLES_PER_OPERATION,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        def answers_without_a_server_error(case: schemathesis.Case) -> None:
            response = case.call(headers=auth)
            assert response.status_code < 500, (
                f"{case.method} {case.formatted_path}: {response.status_code} {response.text[:500]}"
            )

        answers_without_a_server_error()
