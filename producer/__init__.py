"""svdq's producer side: the contract, status records, storage, the client and the CLI. No torch here."""

from producer.client import Client, Job
from producer.contract import InvalidParameter, JobRecord, JobState
from producer.status import JobNotFound

__all__ = ["Client", "InvalidParameter", "Job", "JobNotFound", "JobRecord", "JobState"]
