"""What a finished job adds to a worker's metrics (the scrape over HTTP is tested with a real worker)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from prometheus_client import CollectorRegistry

from producer.contract import JobRecord
from worker.metrics import Metrics


def record(**fields: object) -> JobRecord:
    return JobRecord.model_validate({"id": "j", "state": "succeeded", "attempts": 1, **fields})


def test_a_job_s_record_becomes_counters_and_histograms() -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    metrics.job_started(
        record(state="started", created_at="2026-01-01T00:00:00.000Z", started_at="2026-01-01T00:00:02.500Z")
    )
    metrics.job_ended(
        record(
            timings={"load": 9.0, "denoise": 3.0, "decode": 0.5},
            result={"key": "k", "url": None, "bytes": 1, "frames": 25, "width": 64, "height": 64, "fps": 7, "seed": 1},
            memory={"decode_chunk_size": 8, "peak_bytes": 3 * 1024**3},
        )
    )
    metrics.job_ended(record(state="failed", error={"code": "out_of_memory", "message": "m"}))
    value = registry.get_sample_value
    assert value("svdq_queue_wait_seconds_sum") == 2.5
    assert value("svdq_jobs_total", {"state": "succeeded", "error_code": ""}) == 1
    assert value("svdq_jobs_total", {"state": "failed", "error_code": "out_of_memory"}) == 1
    assert value("svdq_stage_seconds_sum", {"stage": "denoise"}) == 3.0
    assert value("svdq_stage_seconds_count", {"stage": "load"}) is None  # the load is observed once, at start
    assert value("svdq_frames_rendered_total") == 25
    assert value("svdq_gpu_peak_bytes_count") == 1 and value("svdq_gpu_peak_bytes_sum") == 3 * 1024**3


def test_the_grafana_dashboard_only_uses_metrics_workers_export() -> None:
    text = (Path(__file__).parents[2] / "docs" / "grafana-svdq.json").read_text()
    json.loads(text)
    exported = {m.name for m in Metrics(CollectorRegistry()).registry.collect()}
    used = {re.sub(r"_(bucket|total|sum|count)$", "", name) for name in re.findall(r"svdq_[a-z_]+", text)}
    assert used and used <= exported, used - exported
