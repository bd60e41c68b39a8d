"""The CLI in the user's words: help with defaults and ranges, errors named as typed (no services)."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

from producer.cli import build_parser, in_users_words
from producer.contract import InvalidParameter, check_inputs

SVDQ = str(Path(sys.executable).with_name("svdq"))


def subcommands() -> dict[str, argparse.ArgumentParser]:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices.items())


def test_every_option_says_its_default_and_choices() -> None:
    for name, parser in subcommands().items():
        for action in parser._actions:
            if not action.option_strings or isinstance(action, (argparse._HelpAction, argparse._StoreTrueAction)):
                continue
            if action.choices is None or action.default is not None:
                said = "required" if action.required else "default"
                assert action.help and said in action.help, f"svdq {name} {action.option_strings[0]}"
    submit = {a.option_strings[0]: a for a in subcommands()["submit"]._actions if a.option_strings}
    assert "default: 25; 1 to 128" in submit["--frames"].help
    assert "SVDQ_MAX_FRAMES caps it, 64 unless set" in submit["--frames"].help
    assert "64 to 2048, a multiple of 8; SVDQ_MAX_PIXELS caps width x height, 1,048,576" in submit["--width"].help
    assert "SVDQ_MAX_STEPS caps it, 100" in submit["--steps"].help
    assert submit["--format"].choices == ("mp4", "webm", "gif")


def test_errors_use_the_flag_and_the_image_the_user_typed() -> None:
    with pytest.raises(InvalidParameter) as refused:
        check_inputs({"num_frames": 0})
    assert in_users_words(refused.value, "cat.png") == "--frames: must be 1 to 128 (got 0)"
    empty = InvalidParameter("image", "is empty (0 bytes)")
    assert in_users_words(empty, "cat.png") == "image cat.png: is empty (0 bytes)"


def test_version_and_worker_help_without_a_model() -> None:
    version = subprocess.run([SVDQ, "--version"], capture_output=True, text=True, timeout=30)
    assert version.returncode == 0 and version.stdout.startswith("svdq ")
    helped = subprocess.run([SVDQ, "worker", "--help"], capture_output=True, text=True, timeout=60)
    assert helped.returncode == 0, helped.stderr
    assert helped.stdout.startswith("usage: svdq worker")
    ours, celerys = helped.stdout.index("--gpus"), helped.stdout.index("--concurrency")
    assert ours < celerys and "--model-name" in helped.stdout[:celerys]


def test_commands_that_need_the_worker_say_how_to_install_it_on_a_producer_only_install(tmp_path: Path) -> None:
    """`svdq demo` was a traceback from deep inside its worker's start-up where torch is not installed."""
    # None in sys.modules is how Python marks a module that cannot be imported: find_spec says it is not there.
    no_torch = "import sys; sys.modules['torch'] = None; from producer.cli import main; sys.exit(main())"
    for command in (["demo", "--workdir", str(tmp_path / "demo")], ["make-tiny-model", str(tmp_path / "tiny")]):
        run = subprocess.run([sys.executable, "-c", no_torch, *command], capture_output=True, text=True, timeout=60)
        assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr
        assert run.stderr == (
            "svdq: the worker is not installed here: `pip install '.[worker]'` in svdq's checkout (needs torch)\n"
        )
    assert not (tmp_path / "demo").exists()  # nothing was started or made first


def test_building_and_loading_a_model_print_no_advice_to_install_torchvision(tmp_path: Path) -> None:
    """transformers advised it on every worker start and every tiny model: an unpinned torchvision can replace the
    torch installed. (With torchvision installed nothing is advised and this passes trivially.)"""
    # One process, as `svdq demo` runs them: build the tiny model (diffusers' import gave the advice), then load it.
    build_and_load = (
        "import sys; from worker.tiny_model import make_tiny_model; from worker.pipeline import load_renderer; "
        "from worker.settings import WorkerSettings; "
        "load_renderer(WorkerSettings(model=str(make_tiny_model(sys.argv[1])), device='cpu', warmup=False))"
    )
    run = subprocess.run([sys.executable, "-c", build_and_load, str(tmp_path / "tiny")], capture_output=True, text=True)
    assert run.returncode == 0 and (tmp_path / "tiny" / "model_index.json").is_file(), run.stderr
    assert "torchvision" not in run.stderr, run.stderr


def test_a_configuration_mistake_is_one_line_not_a_traceback() -> None:
    mistakes = [
        {"SVDQ_STORAGE_URL": "/var/renders"},
        {"SVDQ_STORAGE_URL": "file://~/renders"},  # was the folder /renders: "~" read as a host name
        {"SVDQ_STORAGE_URL": "file://tmp/renders"},
        {"SVDQ_MAX_FRAMES": "lots"},
        {"SVDQ_REDIS_URL": "notaurl"},  # these four were redis-py's traceback, exit 1
        {"SVDQ_REDIS_URL": "http://localhost:6379"},
        {"SVDQ_REDIS_URL": "redis://localhost:abc/0"},
        {"SVDQ_REDIS_URL": "redis://localhost:6379/x"},
    ]
    for env in mistakes:
        out = subprocess.run(
            [SVDQ, "list"], env={"PATH": "/usr/bin:/bin", **env}, capture_output=True, text=True, timeout=30
        )
        assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
        assert out.stderr.startswith("svdq: configuration: SVDQ_"), out.stderr


def test_a_worker_refuses_a_decode_chunk_size_no_request_could_ask_for() -> None:
    # 0 and -3 used to start a worker whose every job then failed `internal`.
    for value in ("0", "-3", "129"):
        out = subprocess.run(
            [SVDQ, "worker"],
            env={"PATH": "/usr/bin:/bin", "SVDQ_DECODE_CHUNK_SIZE": value},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 2, out.stderr
        assert out.stderr.startswith("svdq worker: configuration: SVDQ_DECODE_CHUNK_SIZE: "), out.stderr
        assert "Traceback" not in out.stderr


def test_the_demo_does_not_import_the_cli() -> None:
    code = "import sys, producer.demo\nassert 'producer.cli' not in sys.modules"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr


def test_a_decode_chunk_size_that_is_not_a_number_says_what_it_takes() -> None:
    out = subprocess.run(
        [SVDQ, "submit", "x.png", "--decode-chunk-size", "foo"], capture_output=True, text=True, timeout=30
    )
    assert out.returncode == 2 and "auto or a number of frames, not 'foo'" in out.stderr  # was "invalid <lambda>"


def test_list_refuses_a_limit_below_one() -> None:
    for value in ("0", "-1"):  # were an empty listing and one job
        out = subprocess.run([SVDQ, "list", "--limit", value], capture_output=True, text=True, timeout=30)
        assert out.returncode == 2 and f"1 or more, not '{value}'" in out.stderr


def test_a_worker_that_stops_before_celery_reports_under_the_hostname_it_was_given() -> None:
    from worker.__main__ import hostname, named

    assert hostname([]) == "svdq@%h"
    assert hostname(["--hostname=a@%h"]) == "a@%h"
    assert hostname(["--hostname", "b@%h", "--loglevel=INFO"]) == "b@%h"  # was svdq@%h: only "=" was read
    assert hostname(["-n", "c@x", "--hostname=d@x"]) == "d@x"
    # Click reads -nNAME as -n NAME: the start-up check of a duplicate name took it as svdq@%h
    assert hostname(["-ne@x", "--loglevel=INFO"]) == "e@x" and named(["-ne@x"]) and not named(["--loglevel=INFO"])
    assert named(["--hostname"]) and hostname(["--hostname"]) == "svdq@%h"  # named, with no name: Celery says so


def test_record_text_reaches_a_terminal_without_its_control_characters() -> None:
    """A record holds what image hosts and raw messages put there: an escape sequence in an error would retitle,
    clear or rewrite the terminal of whoever runs `svdq status`."""
    from producer.contract import JobError, JobRecord, JobState
    from producer.terminal import describe

    hostile = "HTTP/1.1 2OO \x1b]0;PWNED\x07\x1b[2J\x9b31mfake: job succeeded\nsecond line"
    record = JobRecord(id="j1", state=JobState.FAILED, error=JobError(code="internal", message=hostile))
    shown = describe(record)
    assert not any(ch in shown for ch in "\x1b\x07\x9b") and len(shown.splitlines()) == 3
    assert "\\x1b]0;PWNED\\x07\\x1b[2J\\x9b31mfake" in shown and "\\x0asecond line" in shown


def test_the_worker_log_escapes_what_a_message_says_and_keeps_tracebacks_readable() -> None:
    """A job's image reference or a task id in a log line is a sender's text: a newline in it forged a log line
    of its own, an escape sequence drove the terminal of whoever tailed the log."""
    import logging

    from worker.__main__ import LogFormatter

    formatter = LogFormatter("%(levelname)s %(message)s")
    forged = "inputs/y.png\n[2026-11-28: CRITICAL/MainProcess] FORGED \x1b[2J"
    record = logging.LogRecord("w", logging.WARNING, __file__, 1, "job failed: %s", (forged,), None)
    assert (
        formatter.format(record)
        == "WARNING job failed: inputs/y.png\\x0a[2026-11-28: CRITICAL/MainProcess] FORGED \\x1b[2J"
    )
    try:
        raise ValueError("bad \x1b]0;title\x07")
    except ValueError:
        import sys

        record = logging.LogRecord("w", logging.ERROR, __file__, 1, "boom", (), sys.exc_info())
    lines = formatter.format(record).split("\n")
    assert lines[0] == "ERROR boom" and lines[1] == "Traceback (most recent call last):"
    assert lines[-1] == "ValueError: bad \\x1b]0;title\\x07"


def test_a_bulk_flag_s_bad_value_is_said_once_by_its_flag(tmp_path: Path) -> None:
    """`--frames 0` was one problem per image, named `num_frames`, ending in "--skip-invalid renders the rest"."""
    for n in range(3):
        (tmp_path / "in" / f"{n}.png").parent.mkdir(exist_ok=True)
        (tmp_path / "in" / f"{n}.png").write_bytes(b"")
    run = subprocess.run(
        [SVDQ, "bulk", str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--frames", "0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 2 and run.stderr.strip() == "svdq: --frames: must be 1 to 128 (got 0)", run.stderr


def test_a_bulk_src_that_is_not_there_is_said_before_a_setting_s_mistake(tmp_path: Path) -> None:
    env = {**os.environ, "SVDQ_STORAGE_URL": "ftp://nowhere/x"}
    run = subprocess.run(
        [SVDQ, "bulk", str(tmp_path / "typo.csv"), "--out", str(tmp_path / "out")],
        env=env,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 2 and f"{tmp_path / 'typo.csv'}: cannot read it (No such file" in run.stderr, run.stderr
    assert "SVDQ_STORAGE_URL" not in run.stderr


def test_svdq_bench_options_say_their_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    from worker.bench import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--help"])
    helped = " ".join(capsys.readouterr().out.split())
    for option in ("--frames", "--steps", "--width", "--height", "--repeat", "--paths", "--stock-chunk"):
        assert option in helped
    assert "(default: 25; --small: 4)" in helped and "(default: 8)" in helped and "(default: 1)" in helped
