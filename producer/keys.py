"""Every Redis key svdq writes, in one place (Celery's own broker keys are Celery's)."""

PREFIX = "svdq"


def job(job_id: str) -> str:
    """Hash holding one job's record (see producer.contract.JobRecord)."""
    return f"{PREFIX}:job:{job_id}"


JOB_PATTERN = f"{PREFIX}:job:*"
