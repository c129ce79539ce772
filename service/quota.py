"""The disk quota for uploads and results together (``MM_MAX_DATA_BYTES``).

An upload is refused (507) as soon as it would pass what is left, and discarded: nothing
half-written remains. A job is refused at submission when nothing is left; a job whose result
would not fit fails with ``storage_quota_exceeded`` before its result is published (the worker
checks, see :mod:`worker.runner`). Usage is what :func:`jobstore.layout.data_bytes` counts,
unfinished uploads and staged results included, so concurrent writers see each other.
"""

from __future__ import annotations

from starlette.concurrency import run_in_threadpool

from jobstore.layout import data_bytes
from service.errors import APIError
from service.state import ServiceState


def quota_exceeded(limit: int, what: str) -> APIError:
    return APIError(
        507,
        f"{what} would pass the server's storage quota ({limit} bytes for uploads and results); "
        "delete old results or uploads, then retry",
        code="storage_quota_exceeded",
    )


async def remaining_bytes(state: ServiceState, what: str) -> int | None:
    """Bytes left under the quota (None: no quota); 507 when nothing is left."""
    limit = state.settings.max_data_bytes
    if limit is None:
        return None
    left = limit - await run_in_threadpool(data_bytes, state.settings.data_dir)
    if left <= 0:
        raise quota_exceeded(limit, what)
    return left
