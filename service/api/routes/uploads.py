"""`POST /v1/models` and `POST /v1/datasets`: multipart uploads, one file in the `file` field.

The form is parsed inside the route, after authentication, so an unauthenticated client cannot
make the server read a large body; the size limit is enforced on the stream by
`service.middleware.BodyLimit`. Reading, validating and storing run in a worker thread.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response, status
from fastapi.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from allocator.job import UploadKind
from service.api.deps import UNAUTHORIZED, SessionDep, SettingsDep, StoreDep, TenantDep
from service.errors import UnsupportedFormat
from service.quotas import check_stored_bytes, declared_bytes
from service.schemas import ErrorOut, UploadOut
from service.uploads import FORMATS, accept_upload

router = APIRouter(prefix="/v1", tags=["uploads"], responses=UNAUTHORIZED)

FILE_FIELD = "file"


def _openapi(kind: UploadKind) -> dict[str, Any]:
    suffixes = ", ".join(FORMATS[kind].suffixes)
    return {
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "required": [FILE_FIELD],
                        "additionalProperties": False,
                        "properties": {
                            FILE_FIELD: {
                                "type": "string",
                                "format": "binary",
                                "description": f"The file; its name must end in {suffixes}.",
                            }
                        },
                    }
                }
            },
        }
    }


ERRORS: dict[int | str, dict[str, Any]] = {
    status.HTTP_200_OK: {"model": UploadOut, "description": "The same bytes were uploaded before."},
    status.HTTP_413_CONTENT_TOO_LARGE: {"model": ErrorOut, "description": "Above the size limit."},
    status.HTTP_415_UNSUPPORTED_MEDIA_TYPE: {
        "model": ErrorOut,
        "description": "A file type bitplan does not read, or a pickle that needs code.",
    },
    status.HTTP_422_UNPROCESSABLE_CONTENT: {
        "model": ErrorOut,
        "description": "A corrupt or wrongly shaped file.",
    },
}


async def _upload(
    request: Request,
    response: Response,
    kind: UploadKind,
    session: SessionDep,
    tenant: TenantDep,
    store: StoreDep,
    settings: SettingsDep,
) -> UploadOut:
    incoming = declared_bytes(request.headers)
    await run_in_threadpool(check_stored_bytes, session, tenant, settings, incoming)
    async with request.form(max_files=1, max_fields=1) as form:
        file = form.get(FILE_FIELD)
        if not isinstance(file, UploadFile):
            raise UnsupportedFormat(
                f"send multipart/form-data with the file in the {FILE_FIELD!r} field"
            )
        upload, created = await run_in_threadpool(
            accept_upload,
            session,
            store,
            tenant=tenant,
            kind=kind,
            source=file.file,
            filename=file.filename,
            scratch=settings.home / "tmp",
            limits=settings.workers.limits,
        )
    response.status_code = status.HTTP_201_CREATED if created else status.HTTP_200_OK
    return UploadOut.of(upload)


@router.post(
    "/models",
    status_code=status.HTTP_201_CREATED,
    openapi_extra=_openapi(UploadKind.MODEL),
    responses=ERRORS,
    summary="Upload model weights (.safetensors or a torch.save state dict)",
)
async def upload_model(
    request: Request,
    response: Response,
    session: SessionDep,
    tenant: TenantDep,
    store: StoreDep,
    settings: SettingsDep,
) -> UploadOut:
    """Pickles are read with `torch.load(weights_only=True)`: one that needs code is refused
    (415) and nothing in it runs."""
    return await _upload(request, response, UploadKind.MODEL, session, tenant, store, settings)


@router.post(
    "/datasets",
    status_code=status.HTTP_201_CREATED,
    openapi_extra=_openapi(UploadKind.DATASET),
    responses=ERRORS,
    summary="Upload calibration or evaluation data (.npz images, .csv/.tsv pairs, .txt text)",
)
async def upload_dataset(
    request: Request,
    response: Response,
    session: SessionDep,
    tenant: TenantDep,
    store: StoreDep,
    settings: SettingsDep,
) -> UploadOut:
    return await _upload(request, response, UploadKind.DATASET, session, tenant, store, settings)
