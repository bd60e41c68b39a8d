"""`python -m worker [--gpus all|0,1] [--model M] [--model-name N] [celery worker options]`: `svdq worker`."""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
from typing import Any

import click
import pydantic
from celery.signals import celeryd_init
from celery.worker import state as celery_worker_state

from producer.contract import MODEL_NAME_PATTERN, MODEL_NAME_RULE, printable, worker_queues
from producer.settings import settings_error
from worker.settings import WorkerSettings
from worker.startup import (
    LOAD_FAILED,
    LoadFailure,
    check_model,
    check_storage,
    check_unique_name,
    report_to_presence,
)


class LogFormatter(logging.Formatter):
    """Control characters in a log message are escaped (\\xNN): messages quote what senders wrote (an image
    reference; Celery's own lines quote task ids), and a newline there forged a log line of its own, an escape
    sequence drove the terminal of whoever tailed the log. Tracebacks, added after the message, keep their lines
    (and only those)."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = printable(record.message)
        return super().formatMessage(record)

    def formatException(self, ei: Any) -> str:
        return "\n".join(printable(line) for line in super().formatException(ei).split("\n"))


def svdq_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="svdq worker",
        add_help=False,
        usage="svdq worker [--gpus all|0,1] [--model M] [--model-name N] [celery worker options]",
        description="Start a render worker: it loads the model once, keeps it warm and takes one job at a time. "
        "Settings come from SVDQ_* variables (README: Configuration).",
    )
    parser.add_argument(
        "--gpus",
        help="all, or GPU indices like 0,1,3: one supervised worker per GPU (default: one "
        "worker on the device SVDQ_DEVICE picks)",
    )
    parser.add_argument(
        "--model",
        help="hub id or local folder; sets SVDQ_MODEL (default: stabilityai/stable-video-diffusion-img2vid-xt)",
    )
    parser.add_argument(
        "--model-name",
        help="the name jobs use to ask for this model; sets SVDQ_MODEL_NAME (default: the last part of --model)",
    )
    return parser


def svdq_options(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """svdq's own options; everything else is for `celery worker`."""
    return svdq_parser().parse_known_args(argv)


def print_help() -> None:
    """svdq's options first, then Celery's (all accepted), without loading the model or torch."""
    svdq_parser().print_help()
    print(
        "\nsvdq sets --pool=prefork --concurrency=1 --hostname=svdq@%h --queues=(SVDQ_QUEUE's, by priority) "
        "--task-events; any option below overrides them.\n",
        flush=True,
    )
    from celery.bin.celery import celery as celery_command

    celery_command.main(args=["worker", "--help"], prog_name="svdq", standalone_mode=False)


def checked_settings(ours: argparse.Namespace, rest: list[str]) -> WorkerSettings:
    """The worker's settings, with --model and --model-name applied, or exit with one line saying what is wrong:
    2 for a setting that does not parse or a store the worker cannot use, 3 (LOAD_FAILED) for a model that
    cannot load."""
    # Options become settings (and reach supervised children through the environment).
    if ours.model:
        os.environ["SVDQ_MODEL"] = ours.model
    if ours.model_name:
        os.environ["SVDQ_MODEL_NAME"] = ours.model_name
    try:
        settings = WorkerSettings()
    except pydantic.ValidationError as exc:  # before anything starts: one line, not a traceback
        print(f"svdq worker: configuration: {settings_error(exc)}", file=sys.stderr)
        sys.exit(2)
    problem = check_model(settings.model, "--model " if ours.model else "SVDQ_MODEL=")
    if not problem and not re.fullmatch(MODEL_NAME_PATTERN, settings.served_model()):
        name = settings.served_model()
        problem = f"model name {name!r} must be {MODEL_NAME_RULE} (--model-name or SVDQ_MODEL_NAME sets it)"
    if problem:
        _report_early(settings, rest, problem)
        print(f"svdq worker: the model cannot load: {problem}", file=sys.stderr)
        sys.exit(LOAD_FAILED)
    if problem := check_storage(settings):
        problem = " ".join(problem.split())  # one line, the last of the output (botocore's run to several)
        _report_early(settings, rest, f"storage: {problem}")
        print(f"svdq worker: storage: {problem}", file=sys.stderr)
        sys.exit(2)
    return settings


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if "--help" in argv or "-h" in argv:
        print_help()
        return
    ours, rest = svdq_options(argv)
    settings = checked_settings(ours, rest)
    handler = logging.StreamHandler()
    handler.setFormatter(LogFormatter("[%(asctime)s: %(levelname)s/%(processName)s] %(name)s: %(message)s"))
    logging.basicConfig(level=logging.INFO, handlers=[handler])
    if ours.gpus:
        from worker.supervisor import NoGPU, supervise

        if named(rest):
            print(
                "svdq worker: --gpus names its workers gpuN@%h, one per GPU; --hostname would give them all one "
                "name: drop it, or start one worker per GPU yourself (CUDA_VISIBLE_DEVICES=N svdq worker "
                "--hostname NAME)",
                file=sys.stderr,
            )
            sys.exit(2)

        try:
            sys.exit(supervise(ours.gpus, rest))
        except NoGPU as exc:
            print(f"svdq worker: {exc}", file=sys.stderr)
            sys.exit(2)

    if problem := unique_name_problem(settings, rest):
        print(f"svdq worker: {problem}", file=sys.stderr)
        sys.exit(2)

    from worker.app import create_app

    app = create_app(settings)
    failure = LoadFailure.create()
    # Our defaults first: later options on the command line override them.
    defaults = [
        "worker",
        "--loglevel=INFO",
        "--pool=prefork",
        "--concurrency=1",
        "--hostname=svdq@%h",
        f"--queues={','.join(worker_queues(settings.queue, settings.served_model()))}",
        "--task-events",
        # Mingle syncs revoked task ids at start-up and gossip follows other workers' events: svdq cancels
        # through job records and needs neither, and a worker starts a second sooner without them.
        "--without-mingle",
        "--without-gossip",
    ]
    # worker_main drops the worker's exit code (Celery's app.start does not return click's): an "Unrecoverable
    # error" or a cold shutdown exited 0, so a restart policy that acts on failures (systemd's on-failure,
    # Kubernetes' OnFailure) left the worker down.
    workers: list[Any] = []
    celeryd_init.connect(lambda instance=None, **_: workers.append(instance), weak=False)
    try:
        app.worker_main([*defaults, *rest])
    except click.ClickException as exc:  # a Celery option mistyped: one line, as svdq's own options get
        print(f"svdq worker: {exc.format_message()} (svdq worker --help lists them)", file=sys.__stderr__)
        sys.exit(2)
    finally:
        error = failure.read()
        failure.discard()
        if error:  # the pool process could not load the model: the reason is the last thing printed
            # sys.stderr is still Celery's logging proxy here: write to the real one, last.
            print(f"svdq worker: the model failed to load: {error}", file=sys.__stderr__, flush=True)
            sys.exit(LOAD_FAILED)
    code = workers[0].exitcode if workers else None
    # A cold shutdown (SIGQUIT, a second SIGTERM) leaves its code (1) where the worker's loop read it.
    terminated = celery_worker_state.should_terminate
    if not code and type(terminated) is int:
        code = terminated
    sys.exit(code or 0)


def _report_early(settings: WorkerSettings, argv: list[str], problem: str) -> None:
    """The presence key of the node this worker would have been (`svdq top` lists it with the problem)."""
    from celery.utils.nodenames import host_format

    from producer.client import connect_redis

    report_to_presence(
        connect_redis(settings, retry_for=1), host_format(hostname(argv)), settings.served_model(), problem
    )


def unique_name_problem(settings: WorkerSettings, argv: list[str]) -> str | None:
    from celery.utils.nodenames import host_format

    from producer.client import producer_celery

    def answers_ping(name: str) -> bool:
        app = producer_celery(settings)
        try:
            return bool(app.control.ping(destination=[name], timeout=1.0))
        except Exception as exc:  # the broker away: the worker's own start waits for it and says so
            logging.getLogger(__name__).debug("ping of %s failed: %s", name, exc)
            return False
        finally:
            app.close()

    return check_unique_name(settings, host_format(hostname(argv)), answers_ping)


def named(argv: list[str]) -> bool:
    """Whether these Celery options name the node."""
    return given_name(argv) is not None


def hostname(argv: list[str]) -> str:
    """The node name Celery will take: the options', or svdq's default."""
    return given_name(argv) or "svdq@%h"


def given_name(argv: list[str]) -> str | None:
    """The node name these Celery options give (`--hostname=N`, `--hostname N`, `-n N`, `-nN`; the last), if any.
    One parser for both questions above: two had disagreed on `-nN`."""
    name = None
    for i, arg in enumerate(argv):
        if arg.startswith("--hostname="):
            name = arg.split("=", 1)[1]
        elif arg in ("--hostname", "-n"):
            name = argv[i + 1] if i + 1 < len(argv) else ""  # named, with no name: Celery's error to say
        elif arg.startswith("-n") and len(arg) > 2:
            name = arg[2:]
    return name


if __name__ == "__main__":
    main()
