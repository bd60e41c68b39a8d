"""Failures that end a job, carried as data into its record (`error.code`, `error.message`)."""

from __future__ import annotations

from producer.contract import ErrorCode

# Failures worth another attempt: the job itself is fine, something it needs was briefly away.
TRANSIENT = frozenset({ErrorCode.STORAGE_UNAVAILABLE})


class JobFailed(Exception):
    def __init__(self, code: ErrorCode, message: str):
        self.code = code
        self.message = message
        super().__init__(f"{code.value}: {message}")

    @property
    def transient(self) -> bool:
        return self.code in TRANSIENT

    def as_error(self) -> dict[str, str]:
        return {"code": self.code.value, "message": self.message}


def timed_out(detail: str) -> JobFailed:
    """Not transient: a render too long for the limit would be too long on every attempt."""
    return JobFailed(
        ErrorCode.TIMEOUT,
        f"the attempt ran past the job's time limit (SVDQ_JOB_TIMEOUT on its worker): {detail}; it is not "
        "retried (raise SVDQ_JOB_TIMEOUT on the workers for renders this long)",
    )


class JobCanceled(Exception):
    """The job's record was canceled while it ran: stop, free the GPU, take the next job."""


class HandBack(Exception):
    """The worker is stopping and the job's grace period is over: back to its queue for another worker."""
