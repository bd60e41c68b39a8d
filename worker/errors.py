"""Failures that end a job, carried as data into its record (`error.code`, `error.message`)."""

from __future__ import annotations

from producer.contract import ErrorCode


class JobFailed(Exception):
    def __init__(self, code: ErrorCode, message: str):
        self.code = code
        self.message = message
        super().__init__(f"{code.value}: {message}")

    def as_error(self) -> dict[str, str]:
        return {"code": self.code.value, "message": self.message}


class JobCanceled(Exception):
    """The job's record was canceled while it ran: stop, free the GPU, take the next job."""
