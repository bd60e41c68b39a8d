"""svdq's producer side: the contract, status records, storage, the client and the CLI. No torch here.

`from producer import Client` works as before, but nothing is imported until it is asked for: a tool that
needs only the contract (`import producer.contract`) does not load redis, Celery and boto3.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from producer.client import Client, Job
    from producer.contract import InvalidParameter, JobRecord, JobState
    from producer.status import JobNotFound

_HOME = {
    "Client": "producer.client",
    "Job": "producer.client",
    "InvalidParameter": "producer.contract",
    "JobRecord": "producer.contract",
    "JobState": "producer.contract",
    "JobNotFound": "producer.status",
}
__all__ = ["Client", "InvalidParameter", "Job", "JobNotFound", "JobRecord", "JobState"]


def __getattr__(name: str) -> Any:
    if name in _HOME:
        return getattr(importlib.import_module(_HOME[name]), name)
    raise AttributeError(f"module 'producer' has no attribute {name!r}")
