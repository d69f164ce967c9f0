"""The only code that writes rows: every state change of a job, key, upload or profile is here.

Each write function is one transaction and commits before it returns, so the service, the inline
executor, Celery tasks and the CLI share one definition of what a state change means. Concurrent
writers are made safe by guarded UPDATEs and idempotent inserts (`shared`). One module per
aggregate:

- `jobs`: a tenant's jobs: create (idempotently), read, list by page, cancel, results, artifacts.
- `job_leases`: what workers do to a job: claim, heartbeat, progress, finish, fail, requeue
  expired leases, and the bookkeeping of broker messages (`jobs_to_dispatch`).
- `keys`: API keys. `uploads`: uploaded files. `profiles`: cached cost tables.
- `usage`: what the tenant quotas count. `cache`: the shared cache of computed values.
- `latency`: measured latency tables and the requests to measure them on a target's queue.

Functions that take a `tenant` act for a caller of the API and never see another tenant's rows;
the others act for workers, which are trusted and address jobs by id. Callers import this
package (`from db import repositories`) and find every function here.

Never import FastAPI, Celery or torch here.
"""

from db.repositories.cache import (
    cache_bytes,
    cache_uri_in_use,
    drop_cache_entry,
    evict_cache_entries,
    find_cache_entry,
    put_cache_entry,
    touch_cache_entry,
)
from db.repositories.job_leases import (
    ArtifactRecord,
    LeaseSweep,
    PendingDispatch,
    cancel_job,
    claim_job,
    claim_next_job,
    fail_job,
    finish_job,
    heartbeat,
    is_cancel_requested,
    jobs_to_dispatch,
    mark_dispatched,
    release_job,
    requeue_expired_leases,
    update_progress,
)
from db.repositories.jobs import (
    DEFAULT_MAX_ATTEMPTS,
    DEFAULT_QUEUE,
    MAX_PAGE_SIZE,
    IdempotencyConflict,
    InvalidCursor,
    JobPage,
    add_export,
    create_job,
    get_artifact,
    get_job,
    get_result,
    job_by_id,
    list_artifacts,
    list_jobs,
    request_cancel,
)
from db.repositories.keys import (
    API_KEY_SCHEME,
    create_api_key,
    list_api_keys,
    revoke_api_key,
    verify_api_key,
)
from db.repositories.latency import (
    fail_expired_latency_tables,
    fail_latency_table,
    find_latency_table,
    finish_latency_table,
    get_latency_table,
    list_latency_tables,
    measured_latency_table,
    put_latency_table,
    renew_latency_lease,
    request_latency_table,
    start_latency_table,
)
from db.repositories.profiles import ProfileKey, get_profile, get_profile_by_id, put_profile
from db.repositories.shared import canonical_sha256
from db.repositories.uploads import add_upload, get_upload
from db.repositories.usage import count_active_jobs, stored_bytes

__all__ = [
    "API_KEY_SCHEME",
    "DEFAULT_MAX_ATTEMPTS",
    "DEFAULT_QUEUE",
    "MAX_PAGE_SIZE",
    "ArtifactRecord",
    "IdempotencyConflict",
    "InvalidCursor",
    "JobPage",
    "LeaseSweep",
    "PendingDispatch",
    "ProfileKey",
    "add_export",
    "add_upload",
    "cache_bytes",
    "cache_uri_in_use",
    "cancel_job",
    "canonical_sha256",
    "claim_job",
    "claim_next_job",
    "count_active_jobs",
    "create_api_key",
    "create_job",
    "drop_cache_entry",
    "evict_cache_entries",
    "fail_expired_latency_tables",
    "fail_job",
    "fail_latency_table",
    "find_cache_entry",
    "find_latency_table",
    "finish_job",
    "finish_latency_table",
    "get_artifact",
    "get_job",
    "get_latency_table",
    "get_profile",
    "get_profile_by_id",
    "get_result",
    "get_upload",
    "heartbeat",
    "is_cancel_requested",
    "job_by_id",
    "jobs_to_dispatch",
    "list_api_keys",
    "list_artifacts",
    "list_jobs",
    "list_latency_tables",
    "mark_dispatched",
    "measured_latency_table",
    "put_cache_entry",
    "put_latency_table",
    "put_profile",
    "release_job",
    "renew_latency_lease",
    "request_cancel",
    "request_latency_table",
    "requeue_expired_leases",
    "revoke_api_key",
    "start_latency_table",
    "stored_bytes",
    "touch_cache_entry",
    "update_progress",
    "verify_api_key",
]
