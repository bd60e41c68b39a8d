"""Prometheus metrics of one worker, served on SVDQ_METRICS_PORT by the process that runs the jobs.

What Flower's own `/metrics` cannot know: the stages inside a job, the frames, the GPU's peak, why a job
failed (svdq's error codes), how long jobs waited. Counters start at zero when the pool process starts
(Prometheus' `rate()` and `increase()` handle the reset after a restart).
"""

from __future__ import annotations

import logging
from datetime import datetime

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from producer.contract import JobRecord, JobState

log = logging.getLogger(__name__)

# Seconds: a tiny model on a CPU takes tenths, SVD-XT at 1024x576 on one GPU takes minutes.
_STAGE_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 60, 120, 300, 600, 1200)
_WAIT_BUCKETS = (0.1, 0.5, 1, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200)
_GIB = 1024**3
_PEAK_BUCKETS = tuple(g * _GIB for g in (1, 2, 4, 8, 12, 16, 24, 32, 40, 48, 64, 80, 96, 141))


def _seconds_between(start: str | None, end: str | None) -> float | None:
    if not start or not end:
        return None
    parse = datetime.fromisoformat
    return (parse(end.replace("Z", "+00:00")) - parse(start.replace("Z", "+00:00"))).total_seconds()


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.jobs = Counter(
            "svdq_jobs", "Jobs this worker ended, by final state and error code", ["state", "error_code"], registry=r
        )
        self.stage_seconds = Histogram(
            "svdq_stage_seconds",
            "Seconds spent per stage of a job (load: the model, once)",
            ["stage"],
            buckets=_STAGE_BUCKETS,
            registry=r,
        )
        self.frames = Counter("svdq_frames_rendered", "Frames rendered and encoded into delivered videos", registry=r)
        self.queue_wait = Histogram(
            "svdq_queue_wait_seconds", "Seconds from submit to a job's first start", buckets=_WAIT_BUCKETS, registry=r
        )
        self.gpu_peak = Histogram(
            "svdq_gpu_peak_bytes", "GPU memory peak of each job's device work", buckets=_PEAK_BUCKETS, registry=r
        )
        self.model_warm = Gauge("svdq_model_warm", "1 once the pipeline is loaded (and warmed up), else 0", registry=r)
        self.info = Gauge("svdq_worker_info", "The worker's model and device", ["model", "device"], registry=r)

    def serve(self, port: int, addr: str = "0.0.0.0") -> None:
        start_http_server(port, addr=addr, registry=self.registry)
        log.info("metrics on http://%s:%d/metrics", addr, port)

    def model_loaded(self, model: str, device: str, load_seconds: float) -> None:
        self.info.labels(model=model, device=device).set(1)
        self.stage_seconds.labels(stage="load").observe(load_seconds)
        self.model_warm.set(1)

    def job_started(self, record: JobRecord) -> None:
        if record.attempts == 1 and (waited := _seconds_between(record.created_at, record.started_at)) is not None:
            self.queue_wait.observe(max(0.0, waited))

    def job_ended(self, record: JobRecord) -> None:
        code = record.error.code if record.error and record.state is JobState.FAILED else ""
        self.jobs.labels(state=record.state.value, error_code=code).inc()
        for stage, seconds in record.timings.items():
            if stage != "load":  # observed once, when the model loaded
                self.stage_seconds.labels(stage=stage).observe(seconds)
        if record.state is JobState.SUCCEEDED and record.result is not None:
            self.frames.inc(record.result.frames)
        if record.memory is not None and record.memory.peak_bytes is not None:
            self.gpu_peak.observe(record.memory.peak_bytes)
