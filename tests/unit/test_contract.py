"""The request contract and the job-state table: pure logic, no I/O."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from producer.cli import PARAM_FLAGS
from producer.contract import (
    TERMINAL,
    TRANSITIONS,
    InvalidParameter,
    JobParams,
    JobRecord,
    JobRequest,
    JobState,
    Stage,
    check_caps,
    check_inputs,
    check_job_id,
    result_name,
    sources_of,
    worker_queues,
)
from producer.settings import Settings, parse_sentinel_url, redact_url, sentinel_options


def test_defaults_are_svd_xt() -> None:
    p = check_inputs({})
    assert (p.num_frames, p.num_inference_steps, p.fps, p.motion_bucket_id) == (25, 25, 7, 127)
    assert (p.noise_aug_strength, p.min_guidance_scale, p.max_guidance_scale) == (0.02, 1.0, 3.0)
    assert (p.width, p.height) == (1024, 576)


@pytest.mark.parametrize(
    ("params", "named"),
    [
        ({"num_frames": 0}, "num_frames"),
        ({"num_inference_steps": 0}, "num_inference_steps"),
        ({"fps": 0}, "fps"),
        ({"width": 1020}, "width"),
        ({"width": 8}, "width"),
        ({"height": 4000}, "height"),
        ({"motion_bucket_id": 256}, "motion_bucket_id"),
        ({"noise_aug_strength": -0.1}, "noise_aug_strength"),
        ({"decode_chunk_size": 0}, "decode_chunk_size"),
        ({"seed": -1}, "seed"),
        ({"num_frames": "25"}, "num_frames"),
        ({"num_frames": 2.5}, "num_frames"),
        ({"min_guidance_scale": 2.0, "max_guidance_scale": 1.5}, "max_guidance_scale"),
        ({"frames_to_decode_at_once": 4}, "frames_to_decode_at_once"),
        ({"model": "SVD XT"}, "model"),
        ({"model": "a" * 65}, "model"),
    ],
)
def test_a_bad_parameter_is_named(params: dict[str, Any], named: str) -> None:
    with pytest.raises(InvalidParameter) as err:
        check_inputs(params)
    assert err.value.param == named
    assert str(err.value).startswith(f"{named}: ")


def test_a_request_needs_an_image() -> None:
    with pytest.raises(InvalidParameter) as err:
        check_inputs({"num_frames": 4}, JobRequest)
    assert err.value.param == "image"
    assert check_inputs({"image": "s3://b/k.png", "num_frames": 4}, JobRequest).image == "s3://b/k.png"


def test_every_cli_flag_sets_a_real_parameter() -> None:
    assert {field for field, _ in PARAM_FLAGS.values()} == set(JobParams.model_fields)


def test_terminal_states_never_change() -> None:
    for state in TERMINAL:
        assert state.is_terminal()
        assert TRANSITIONS[state] == frozenset()


def test_every_state_has_a_row_and_can_be_reached() -> None:
    assert set(TRANSITIONS) == {None, *JobState}
    assert {target for targets in TRANSITIONS.values() for target in targets} == set(JobState)


def test_retry_and_cancel_paths() -> None:
    assert JobState.QUEUED in TRANSITIONS[JobState.STARTED]  # retry
    assert sources_of(JobState.CANCELED) == [JobState.QUEUED, JobState.STARTED]
    assert sources_of(JobState.QUEUED) == [None, JobState.STARTED]


def test_retry_backoff_doubles_with_jitter_and_a_cap() -> None:
    from worker.backoff import backoff

    assert [backoff(n, 2.0, 60.0, 0.5) for n in (1, 2, 3, 4)] == [2.0, 4.0, 8.0, 16.0]
    assert backoff(10, 2.0, 60.0, 0.5) == 60.0
    assert backoff(1, 2.0, 60.0, 0.0) == 1.0 and backoff(1, 2.0, 60.0, 0.999) < 3.0


def test_a_worker_reads_its_model_and_any_model_at_each_priority_level() -> None:
    assert worker_queues("celery", "svd-xt") == [
        "celery@svd-xt.high",
        "celery.high",
        "celery@svd-xt",
        "celery",
        "celery@svd-xt.low",
        "celery.low",
    ]
    assert check_inputs({"model": "svd-xt"}).model == "svd-xt"


def test_a_sentinel_url_gives_its_nodes_password_and_db_and_is_redacted_in_logs() -> None:
    url = "sentinel://:pw@10.0.0.1:26379;sentinel://:pw@10.0.0.2/2"
    assert parse_sentinel_url(url) == ([("10.0.0.1", 26379), ("10.0.0.2", 26379)], "pw", 2)
    assert redact_url(url) == "sentinel://:***@10.0.0.1:26379;sentinel://:***@10.0.0.2/2"
    assert sentinel_options(Settings(redis_url=url, sentinel_master="renders")) == {"master_name": "renders"}
    assert sentinel_options(Settings(redis_url="redis://localhost:6379/0")) == {}


def test_every_celery_client_restores_overdue_messages_at_the_same_visibility_timeout() -> None:
    """kombu restores messages unacknowledged past the visibility timeout from any client that consumes,
    `svdq ping`'s reply queue included: the producers' apps used kombu's hour, so a render longer than that was
    redelivered whatever SVDQ_VISIBILITY_TIMEOUT the workers had."""
    from producer.client import producer_celery
    from worker.app import broker_options
    from worker.settings import WorkerSettings

    settings = WorkerSettings(visibility_timeout=7200, redis_url="sentinel://10.0.0.1:26379/0")
    producer = producer_celery(settings)
    assert producer.conf.broker_transport_options == {
        "master_name": "mymaster",
        "visibility_timeout": 7200,
        "socket_timeout": 30,  # kombu's default is none: a publish to a vanished broker waited for ever
        "socket_connect_timeout": 10,
    }
    assert broker_options(settings)["visibility_timeout"] == 7200


@pytest.mark.parametrize(
    "bad",
    [12345, 1.5, None, True, [1], {"a": 1}, "", "a/../b", "../../x", "x\nFAKE", "a" * 65, "nul\x00", "sp ace", "é"],
)
def test_job_ids_have_one_grammar_checked_where_a_path_is_built(bad: object) -> None:
    with pytest.raises(InvalidParameter) as refused:
        check_job_id(bad)
    assert refused.value.param == "job_id" and "\n" not in str(refused.value)
    if isinstance(bad, str):
        with pytest.raises(InvalidParameter):
            result_name(bad)


def test_our_own_ids_fit_the_grammar() -> None:
    import uuid

    assert check_job_id(uuid.uuid4().hex) and check_job_id("a" * 64) and check_job_id("Job_1-2")
    assert result_name("abc", "webm") == "abc/video.webm"


def test_operator_caps_name_the_parameter_and_the_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    caps = {"max_frames": 64, "max_pixels": 1024 * 1024, "max_steps": 100}
    check_caps(check_inputs({"num_frames": 64, "width": 1024, "height": 1024, "num_inference_steps": 100}), **caps)
    for params, param, cap in [
        ({"num_frames": 65}, "num_frames", "SVDQ_MAX_FRAMES=64"),
        ({"width": 2048, "height": 576}, "width", "SVDQ_MAX_PIXELS=1,048,576"),
        ({"num_inference_steps": 101}, "num_inference_steps", "SVDQ_MAX_STEPS=100"),
    ]:
        with pytest.raises(InvalidParameter) as refused:
            check_caps(check_inputs(params), **caps)
        assert refused.value.param == param and cap in refused.value.message
    monkeypatch.setenv("SVDQ_MAX_FRAMES", "8")
    with pytest.raises(InvalidParameter, match="SVDQ_MAX_FRAMES=8"):
        Settings().check_caps(check_inputs({"num_frames": 9}))


def test_the_contract_imports_without_the_clients_dependencies() -> None:
    code = (
        "import sys, producer.contract, producer.keys\n"
        "heavy = [m for m in ('redis', 'celery', 'kombu', 'boto3', 'torch') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "from producer import Client, JobState\n"  # the package's names still resolve, on demand
        "assert Client.__module__ == 'producer.client' and 'redis' in sys.modules\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr


def test_the_readme_lists_every_stage_and_no_other() -> None:
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    row = next(line for line in readme.splitlines() if line.startswith("| `stage`, `progress` |"))
    named = set(re.findall(r"`([a-z_]+)`", row)) - {"stage", "progress", "SVDQ_WARMUP"}
    assert named == {stage.value for stage in Stage}


def test_the_readme_documents_every_setting() -> None:
    from producer.settings import Settings
    from worker.settings import WorkerSettings

    readme = (Path(__file__).parents[2] / "README.md").read_text()
    table = {
        name
        for line in readme.splitlines()
        if line.startswith("| `SVDQ_")
        for name in re.findall(r"`(SVDQ_\w+)`", line)
    }
    fields = {f"SVDQ_{name.upper()}" for cls in (Settings, WorkerSettings) for name in cls.model_fields}
    assert fields - table == set()


def test_a_misspelt_variable_is_named_with_the_setting_it_was_meant_to_be() -> None:
    """SVDQ_REDIS_ULR left the default Redis in use without a word; the CLI warns of it now. The producer knows the
    worker's settings by name (it never imports worker): this keeps the two lists equal."""
    from producer.settings import WORKER_SETTINGS, Settings, unknown_variables
    from worker.settings import WorkerSettings

    assert set(WorkerSettings.model_fields) - set(Settings.model_fields) == WORKER_SETTINGS
    environ = {"SVDQ_REDIS_ULR": "redis://x", "SVDQ_MAX_FRAMES": "9", "SVDQ_LEASE_TTL": "5", "SVDQ_XYZZY": "1"}
    assert unknown_variables(environ) == [
        "SVDQ_REDIS_ULR is not a setting svdq knows (did you mean SVDQ_REDIS_URL?); it is ignored",
        "SVDQ_XYZZY is not a setting svdq knows; it is ignored",
    ]
    # Every variable the code names on its own (os.environ["SVDQ_..."], the worker's hand-offs to its children)
    # is one it knows: a new internal one left out would be warned of as a typo on every command.
    root = Path(__file__).parents[2]
    named = {
        node.value
        for source in [*(root / "producer").rglob("*.py"), *(root / "worker").rglob("*.py")]
        for node in ast.walk(ast.parse(source.read_text()))
        if isinstance(node, ast.Constant) and re.fullmatch(r"SVDQ_[A-Z0-9_]+", str(node.value))
    }
    assert {"SVDQ_LOAD_ERROR_FILE", "SVDQ_WORKER_MAIN_PID", "SVDQ_GATEWAY_UNSAFE_NO_AUTH"} <= named
    assert unknown_variables(dict.fromkeys(named, "")) == []


def test_the_readme_s_record_table_lists_every_field_of_the_record() -> None:
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    section = readme.split("### The job record", 1)[1].split("Terminal records expire", 1)[0]
    first_cells = [line.split("|")[1] for line in section.splitlines() if line.startswith("| `")]
    listed = {name for cell in first_cells for name in re.findall(r"`([a-z_]+)`", cell)}
    assert set(JobRecord.model_fields) - listed == set()  # owner and webhook_error were missing


def test_a_reused_key_s_request_differs_only_by_what_both_requests_hold() -> None:
    from producer.client import KeyConflict, check_same_request

    held = {"image": "s3://b/inputs/a.png", "num_frames": 14, "noise_aug_strength": 0.02, "seed": None}
    check_same_request("j1", held, dict(held))
    check_same_request("j1", held, {**held, "added_since": 1})  # a record from an older svdq lacks it
    check_same_request("j1", held, {"num_frames": 14, "seed": None})  # the image, not read (submit_many)
    with pytest.raises(KeyConflict) as refused:
        check_same_request("j1", held, {**held, "seed": 3, "image": "s3://b/inputs/b.png"})
    assert refused.value.differ == ["image", "seed"] and refused.value.param == "idempotency_key"
    assert isinstance(refused.value, InvalidParameter) and "(image, seed differ)" in refused.value.message
