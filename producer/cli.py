"""`svdq`: submit, follow and fetch renders; start workers; watch the fleet; benchmark; build the tiny model; demo.

Exit codes: 0 ok (or the job succeeded), 1 the job failed or was canceled, 2 bad usage or a bad
parameter, 3 no such job, 4 timed out waiting, 5 Redis, storage or workers unreachable, 6 refused (cancel
of a job that already ended).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import os
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import kombu.exceptions
import pydantic
import redis

from producer import top
from producer.client import URL_SCHEMES, Client, KeyConflict, NotCancelable, connect_redis, producer_celery
from producer.contract import (
    PRIORITIES,
    InvalidParameter,
    JobParams,
    JobState,
    bounds,
    check_inputs,
    printable,
    renamed,
)
from producer.flower import FlowerRefused, flower_command
from producer.settings import ConfigurationError, Settings, settings_error, unknown_variables
from producer.status import JobNotFound, MalformedRecord, StatusStore
from producer.storage import StorageUnavailable
from producer.terminal import (
    EXIT_BROKEN_PIPE,
    EXIT_INTERRUPTED,
    EXIT_JOB_FAILED,
    EXIT_NOT_FOUND,
    EXIT_OK,
    EXIT_REFUSED,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
    CliError,
    check_output,
    describe,
    print_json,
    wait_and_report,
)

if TYPE_CHECKING:
    from producer.bulk import Item


# CLI flag -> the request field it sets (diffusers' argument names).
def positive(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise argparse.ArgumentTypeError(f"a whole number of 1 or more, not {value!r}")
    return number


def auto_or_frames(value: str) -> str | int:
    if value == "auto":
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"auto or a number of frames, not {value!r}") from None


PARAM_FLAGS: dict[str, tuple[str, Callable[[str], Any]]] = {
    "--frames": ("num_frames", int),
    "--steps": ("num_inference_steps", int),
    "--fps": ("fps", int),
    "--width": ("width", int),
    "--height": ("height", int),
    "--seed": ("seed", int),
    "--motion-bucket-id": ("motion_bucket_id", int),
    "--noise-aug-strength": ("noise_aug_strength", float),
    "--min-guidance": ("min_guidance_scale", float),
    "--max-guidance": ("max_guidance_scale", float),
    "--decode-chunk-size": ("decode_chunk_size", auto_or_frames),
    "--format": ("format", str),
    "--model": ("model", str),
}
FLAG_OF = {field: flag for flag, (field, _) in PARAM_FLAGS.items()} | {
    "idempotency_key": "--key",
    "webhook": "--webhook",
    "priority": "--priority",
}
# Defaults that are not a value of the contract's.
DEFAULT_WORDS = {
    "seed": "random, recorded in the result",
    "decode_chunk_size": "the worker's SVDQ_DECODE_CHUNK_SIZE, auto unless set",
    "model": "any worker's; a name some workers serve (SVDQ_MODEL_NAME)",
}


# The operator's caps under the contract's ranges: a help that said only "1 to 128" promised frames that a
# default deployment refuses (SVDQ_MAX_FRAMES is 64).
CAPPED_BY = {
    "num_frames": "max_frames",
    "num_inference_steps": "max_steps",
    "width": "max_pixels",
    "height": "max_pixels",
}


def param_help(field: str) -> str:
    """`--frames`'s help: the request field it sets, its default, its range and the operator's cap on it."""
    default = DEFAULT_WORDS.get(field, str(JobParams.model_fields[field].default))
    allowed = bounds(field)
    if field in CAPPED_BY:
        cap = CAPPED_BY[field]
        what = "width x height" if cap == "max_pixels" else "it"
        allowed = f"{allowed}; SVDQ_{cap.upper()} caps {what}, {Settings.model_fields[cap].default:,} unless set"
    return f"{field} (default: {default}{'; ' + allowed if allowed else ''})"


def in_users_words(exc: InvalidParameter, image: str) -> str:
    """The error as the user typed the command: the flag's name, the image's name."""
    if isinstance(exc, KeyConflict):
        differ = ", ".join(FLAG_OF.get(name, name) for name in exc.differ)
        return f"--key: already names job {exc.job_id}, a different render ({differ} differ): use a new key"
    if exc.param == "image":
        return f"image: {exc.message}" if image in exc.message else f"image {image}: {exc.message}"
    flag = FLAG_OF.get(exc.param, exc.param)
    if exc.param == "width" and "SVDQ_MAX_PIXELS" in exc.message:
        flag = "--width/--height"
    return f"{flag}: {renamed(exc.message, FLAG_OF)}"


def cmd_submit(args: argparse.Namespace) -> int:
    params = {field: getattr(args, field) for field, _ in PARAM_FLAGS.values() if getattr(args, field) is not None}
    image = args.image if args.image.startswith(URL_SCHEMES) else Path(args.image)
    if args.output is not None and not args.wait:
        raise CliError("--output needs --wait (or, later: svdq wait JOB_ID --output FILE)", EXIT_USAGE)
    check_output(args.output)
    with Client.from_env() as client:
        try:
            job = client.submit(image, priority=args.priority, idempotency_key=args.key, webhook=args.webhook, **params)
        except InvalidParameter as exc:
            raise CliError(in_users_words(exc, args.image), EXIT_USAGE) from None
        if not args.wait:
            if args.json:
                print_json(job.status().to_json_dict())
            else:
                print(job.id)
            return EXIT_OK
        if not args.json:
            print(job.id, flush=True)
        return wait_and_report(job, args.timeout, args.output, args.json, quiet=True)


def cmd_bulk(args: argparse.Namespace) -> int:
    from producer import bulk

    defaults = {field: getattr(args, field) for field, _ in PARAM_FLAGS.values() if getattr(args, field) is not None}
    try:  # a flag's own bad value, once and by its flag (not once per image, by the parameter's name)
        check_inputs(defaults)
    except InvalidParameter as exc:
        raise CliError(in_users_words(exc, str(args.src)), EXIT_USAGE) from None
    if args.images_root is not None and not args.images_root.is_dir():
        raise CliError(f"--images-root {args.images_root}: not a folder", EXIT_USAGE)
    read = _bulk_inputs(args)
    with Client.from_env() as client:
        items = _planned(args, defaults, client, read)
        run = bulk.Run(client, items, args.out, priority=args.priority, retry_failed=args.retry_failed)
        try:
            run.open_report()  # before any job exists: an --out that cannot hold it is a usage error
        except bulk.OutUnusable as exc:
            raise CliError(str(exc), EXIT_USAGE) from None
        terminal = sys.stdout.isatty() and sys.stderr.isatty()
        display = bulk.Display(len(items), "json" if args.json else "bar" if terminal else "lines")
        run.on_end, run.on_poll = display.ended, display.polled
        try:
            interrupted, canceled = run.execute(wait=not args.no_wait, cancel_on_interrupt=args.cancel_on_interrupt)
        finally:
            display.close()
        summary = run.summary()
    if args.json:
        print_json(summary)
    else:
        print(bulk.summary_text(summary, args.out))
    if interrupted:
        if args.cancel_on_interrupt:
            print(f"svdq: interrupted: canceled {canceled} unfinished jobs", file=sys.stderr)
        else:
            print(
                "svdq: interrupted: stopped following; the unfinished jobs go on: run the same command again to resume",
                file=sys.stderr,
            )
        return EXIT_INTERRUPTED
    return EXIT_JOB_FAILED if summary["failed"] else EXIT_OK


def _bulk_inputs(args: argparse.Namespace) -> tuple[list[Item], list[str]]:
    """SRC's inputs, and the problems no --skip-invalid passes (an unknown column: no row can be rendered as
    written). Read before the client is made: a missing SRC is said before a setting's mistake."""
    from producer import bulk

    try:
        items, fatal = bulk.read_inputs(args.src, args.images_root), []
    except bulk.ManifestError as exc:
        if exc.items is None:
            raise CliError(str(exc), EXIT_USAGE) from None
        items, fatal = exc.items, exc.problems
    if not items:
        raise CliError(f"{args.src}: no images in it ({', '.join(sorted(bulk.IMAGE_SUFFIXES))})", EXIT_USAGE)
    return items, fatal


def _planned(
    args: argparse.Namespace, defaults: dict[str, Any], client: Client, read: tuple[list[Item], list[str]]
) -> list[Item]:
    """The inputs planned; every problem found in them is one usage error, before anything is submitted (the rows'
    own problems with the header's: one fix-and-retry, not one per kind of problem)."""
    from producer import bulk

    items, fatal = read
    problems = fatal + bulk.plan(items, defaults, client.intake)
    if fatal or (problems and not args.skip_invalid):
        hint = "" if fatal else "; --skip-invalid renders the rest"
        raise CliError(f"{bulk.ManifestError(problems)}\nnothing was submitted{hint}", EXIT_USAGE)
    return items


def cmd_status(args: argparse.Namespace) -> int:
    with Client.from_env() as client:
        record = client.job(args.job_id).status()
    if args.json:
        print_json(record.to_json_dict())
    else:
        print(describe(record))
    return EXIT_OK


def cmd_wait(args: argparse.Namespace) -> int:
    with Client.from_env() as client:
        job = client.job(args.job_id)
        job.status()  # unknown ids fail now, not after the timeout
        check_output(args.output)
        return wait_and_report(job, args.timeout, args.output, args.json, quiet=False)


def cmd_cancel(args: argparse.Namespace) -> int:
    with Client.from_env() as client:
        try:
            record = client.job(args.job_id).cancel()
        except NotCancelable as exc:
            raise CliError(str(exc), EXIT_REFUSED) from None
    if args.json:
        print_json(record.to_json_dict())
    else:
        print(f"canceled {record.id}")
    return EXIT_OK


def cmd_list(args: argparse.Namespace) -> int:
    with Client.from_env() as client:
        records = client.list(args.state, args.limit)
    if args.json:
        print_json([r.to_json_dict() for r in records])
        return EXIT_OK
    for r in records:
        where = (
            f"{r.stage or '-'} {r.progress:.0%}" if r.state is JobState.STARTED else (r.error.code if r.error else "")
        )
        print(printable(f"{r.id}  {r.state.value:<9}  {r.created_at or '':<24}  {where}"))
    if not records and sys.stdout.isatty():  # a script reads no lines; a person reads why
        print(f"no {args.state + ' ' if args.state else ''}jobs (records expire SVDQ_RESULT_TTL after they end)")
    return EXIT_OK


def cmd_make_tiny_model(args: argparse.Namespace) -> int:
    argv = [str(args.directory), *(["--full-vae"] if args.full_vae else [])]
    run_worker_module("worker.tiny_model", argv)
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    from producer.demo import run_demo

    check_worker_installed()  # the demo runs one, and builds the tiny model with torch

    return run_demo(workdir=args.workdir, output=args.output)


def cmd_flower(args: argparse.Namespace) -> int:
    try:
        argv, env = flower_command(Settings(), args.port, address=args.address, unsafe_no_auth=args.unsafe_no_auth)
    except FlowerRefused as exc:
        raise CliError(str(exc), EXIT_USAGE) from None
    os.execve(argv[0], argv, env)
    return 0  # not reached


def cmd_gateway(args: argparse.Namespace) -> int:
    if importlib.util.find_spec("fastapi") is None or importlib.util.find_spec("uvicorn") is None:
        raise CliError("the gateway is not installed here: `pip install '.[gateway]'` in svdq's checkout", EXIT_USAGE)
    from producer import gateway

    settings = Settings()
    try:
        gateway.create_app(settings, unsafe_no_auth=args.unsafe_no_auth)  # refuses bad keys before listening
    except ValueError as exc:
        raise CliError(str(exc), EXIT_USAGE) from None
    gateway.serve(args.host, args.port, args.workers, args.unsafe_no_auth)
    return EXIT_OK


def cmd_top(args: argparse.Namespace) -> int:
    settings = Settings()
    celery = producer_celery(settings)
    try:
        top.run(
            celery,
            StatusStore(connect_redis(settings), result_ttl=settings.result_ttl),
            settings.queue,
            args.interval,
            args.once,
            args.json,
        )
    finally:
        celery.close()
    return EXIT_OK


def cmd_ping(args: argparse.Namespace) -> int:
    """Exit 0 once a worker answers (compose's healthcheck); 5 when none does within the timeout."""
    from celery.utils.nodenames import host_format

    # %h, %n and %d as `svdq worker --hostname` takes them: compose asks for gpu0@%h, its container's own worker.
    name = host_format(args.hostname) if args.hostname else None
    celery = producer_celery(Settings())
    try:
        replies = celery.control.ping(destination=[name] if name else None, timeout=args.timeout)
    finally:
        celery.close()
    names = sorted(name for reply in replies for name in reply)
    if not names:
        who = f"worker {name}" if name else "worker"
        raise CliError(
            f"no {who} answered within {args.timeout:g}s (starting, or down: see `svdq top`)", EXIT_UNAVAILABLE
        )
    if args.json:
        print_json(names)
    else:
        print("\n".join(names))
    return EXIT_OK


def check_worker_installed() -> None:
    if importlib.util.find_spec("worker") is None or importlib.util.find_spec("torch") is None:
        raise CliError(
            "the worker is not installed here: `pip install '.[worker]'` in svdq's checkout (needs torch)", EXIT_USAGE
        )


def run_worker_module(module: str, argv: list[str]) -> None:
    """Replace this process with one of the worker's entry points (the producer never imports it)."""
    check_worker_installed()
    os.execv(sys.executable, [sys.executable, "-m", module, *argv])


def version() -> str:
    try:
        return importlib.metadata.version("svdq")
    except importlib.metadata.PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown (not installed)"


def add_param_flags(parser: argparse.ArgumentParser, **helps: str) -> None:
    """The render flags (`--frames` ...), each named after the request field it sets; `helps` overrides a help."""
    for flag, (field, kind) in PARAM_FLAGS.items():
        metavar = {int: "N", float: "X"}.get(kind, "VALUE")  # type: ignore[call-overload]
        choices = ("mp4", "webm", "gif") if field == "format" else None
        parser.add_argument(
            flag,
            dest=field,
            type=kind,
            metavar=None if choices else metavar,
            choices=choices,
            help=helps.get(field) or param_help(field),
        )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="svdq",
        description="A render queue for Stable Video Diffusion.",
        epilog=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"svdq {version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    submit = sub.add_parser("submit", help="queue an image-to-video render; prints the job id")
    submit.add_argument("image", help="a local image file, or an s3://, file:// or http(s):// URL")
    add_param_flags(submit)
    submit.add_argument("--priority", choices=PRIORITIES, default="normal", help="queue order (default: normal)")
    submit.add_argument(
        "--key",
        help="idempotency key, 1 to 200 characters: a resubmit with the same key returns the same job (default: none)",
    )
    submit.add_argument(
        "--webhook",
        metavar="URL",
        help="POST signed events here, started then the end (default: none; workers need SVDQ_WEBHOOK_SECRET)",
    )
    submit.add_argument("--wait", action="store_true", help="wait for the job to end; exit 0 only if it succeeded")
    submit.add_argument("--timeout", type=float, help="with --wait: seconds to wait at most (default: no limit)")
    submit.add_argument("--output", type=Path, help="with --wait: download the video here (default: none)")
    submit.add_argument("--json", action="store_true", help="print the job's status record as JSON")
    submit.set_defaults(func=cmd_submit)

    bulk = sub.add_parser(
        "bulk",
        help="render a folder or a manifest of images into a folder of videos; resumable",
        description="Render every image in SRC (a folder, searched recursively, or a .csv/.jsonl "
        "manifest with an `image` column, optional `output` and render-parameter columns) into "
        "--out, mirroring SRC's layout, with a report in OUT/svdq-bulk.jsonl. Re-running the "
        "same command submits nothing new: it follows the jobs and downloads what is missing. "
        "Without --seed, each image's seed derives from its content, so a re-run makes the "
        "same video. Exit 0 when all succeeded, 1 when any failed, 130 on Ctrl-C.",
    )
    bulk.add_argument("src", type=Path, help="a folder of images, or a .csv or .jsonl manifest")
    bulk.add_argument("--out", type=Path, required=True, help="the folder the videos and the report go to (required)")
    bulk.add_argument(
        "--images-root",
        type=Path,
        metavar="DIR",
        help="a manifest's images may be read from anywhere in DIR, links followed (default: the manifest's own "
        "folder; SRC for a folder; / for any file you can read)",
    )
    add_param_flags(bulk, seed="seed (default: derived from each image's content)")
    bulk.add_argument(
        "--priority", choices=PRIORITIES, default="low", help="queue order (default: low, so interactive jobs go first)"
    )
    bulk.add_argument(
        "--skip-invalid",
        action="store_true",
        help="render the valid rows when some are not (default: report every problem and submit nothing)",
    )
    bulk.add_argument(
        "--retry-failed",
        action="store_true",
        help="submit again the inputs whose job failed or was canceled (default: report them)",
    )
    bulk.add_argument("--no-wait", action="store_true", help="submit and exit; a later run follows and downloads")
    bulk.add_argument(
        "--cancel-on-interrupt",
        action="store_true",
        help="on Ctrl-C, cancel the unfinished jobs (default: leave them running)",
    )
    bulk.add_argument("--json", action="store_true", help="print only the final summary, as JSON")
    bulk.set_defaults(func=cmd_bulk)

    status = sub.add_parser("status", help="show a job's status")
    status.add_argument("job_id")
    status.add_argument("--json", action="store_true", help="the whole record as JSON")
    status.set_defaults(func=cmd_status)

    wait = sub.add_parser("wait", help="wait for a job to end; exit 0 only if it succeeded")
    wait.add_argument("job_id")
    wait.add_argument("--timeout", type=float, help="seconds to wait at most, then exit 4 (default: no limit)")
    wait.add_argument("--output", type=Path, help="download the video here (default: none)")
    wait.add_argument("--json", action="store_true", help="print the final record as JSON")
    wait.set_defaults(func=cmd_wait)

    cancel = sub.add_parser("cancel", help="cancel a queued or running job")
    cancel.add_argument("job_id")
    cancel.add_argument("--json", action="store_true", help="print the record as JSON")
    cancel.set_defaults(func=cmd_cancel)

    listing = sub.add_parser("list", help="the newest jobs, optionally in one state")
    listing.add_argument("--state", choices=[s.value for s in JobState], help="only jobs in this state (default: all)")
    listing.add_argument(
        "--limit", type=positive, default=20, help="at most this many, newest first (1 or more; default: 20)"
    )
    listing.add_argument("--json", action="store_true", help="records as JSON")
    listing.set_defaults(func=cmd_list)

    sub.add_parser(
        "worker",
        help="start a worker: --gpus, --model, --model-name, and any `celery worker` option (`svdq worker --help`)",
        add_help=False,
    )
    sub.add_parser("bench", help="stock diffusers vs svdq on this GPU and model (`svdq bench --help`)", add_help=False)

    tiny = sub.add_parser("make-tiny-model", help="write a tiny random-weights SVD pipeline to DIR")
    tiny.add_argument("directory", type=Path)
    tiny.add_argument(
        "--full-vae", action="store_true", help="SVD's full-size VAE, for memory benchmarks (default: a tiny one)"
    )
    tiny.set_defaults(func=cmd_make_tiny_model)

    flower = sub.add_parser("flower", help="start Flower, Celery's dashboard, on the configured broker (basic auth)")
    flower.add_argument("--port", type=int, default=5555, help="default: 5555")
    flower.add_argument(
        "--address",
        default="127.0.0.1",
        help="the address to listen on (default: 127.0.0.1; 0.0.0.0 for every interface)",
    )
    flower.add_argument(
        "--unsafe-no-auth", action="store_true", help="allow Flower without authentication (default: refused)"
    )
    flower.set_defaults(func=cmd_flower)

    gw = sub.add_parser("gateway", help="serve the HTTP API (POST /v1/jobs, SSE events...) for web backends")
    gw.add_argument("--host", default="127.0.0.1", help="the address to listen on (default: 127.0.0.1)")
    gw.add_argument("--port", type=int, default=8000, help="default: 8000")
    gw.add_argument("--workers", type=int, default=1, help="uvicorn worker processes (default: 1)")
    gw.add_argument(
        "--unsafe-no-auth",
        action="store_true",
        help="serve without API keys (default: refused unless SVDQ_API_KEYS is set)",
    )
    gw.set_defaults(func=cmd_gateway)

    top = sub.add_parser("top", help="workers, what they render, and the queues, refreshed live")
    top.add_argument("--interval", type=float, default=2.0, help="seconds between refreshes (default: 2)")
    top.add_argument("--once", action="store_true", help="print once and exit")
    top.add_argument("--json", action="store_true", help="one JSON line per snapshot (with --once: one document)")
    top.set_defaults(func=cmd_top)

    ping = sub.add_parser("ping", help="exit 0 if a worker (or the one named) answers; 5 if none does")
    ping.add_argument(
        "--hostname",
        metavar="NAME",
        help="the worker's node name, e.g. gpu0@host or gpu0@%%h (this host's; default: any)",
    )
    ping.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for answers (default: 5)")
    ping.add_argument("--json", action="store_true", help="print the names that answered as JSON")
    ping.set_defaults(func=cmd_ping)

    demo = sub.add_parser("demo", help="start Redis (if needed) and a worker, render an example, stop them")
    demo.add_argument(
        "--workdir",
        type=Path,
        default=Path(".svdq-demo"),
        help="its Redis, store and model go here (default: .svdq-demo)",
    )
    demo.add_argument("--output", type=Path, default=Path("svdq-demo.mp4"), help="the video (default: svdq-demo.mp4)")
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    for line in unknown_variables(os.environ):
        print(f"svdq: warning: {line}", file=sys.stderr)
    try:
        if argv[:1] == ["worker"]:
            run_worker_module("worker", argv[1:])
        if argv[:1] == ["bench"]:
            run_worker_module("worker.bench", argv[1:])
        args = build_parser().parse_args(argv)
        # Pillow warns on broken images ("Invalid APNG ..."); the image's refusal already says what is wrong.
        warnings.filterwarnings("ignore", module="PIL")
        code = args.func(args)
        sys.stdout.flush()  # here, where a closed pipe is caught, not at exit
    except BrokenPipeError:  # `svdq list | head`: the reader has all it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush
        code = EXIT_BROKEN_PIPE
    except (Exception, KeyboardInterrupt) as exc:
        message, code = explain(exc)
        print(f"svdq: {message}", file=sys.stderr)
    sys.exit(code)


def explain(exc: BaseException) -> tuple[str, int]:
    """The line a user reads for an error that ends the command, and the exit code; a bug re-raises."""
    if isinstance(exc, CliError):
        return str(exc), exc.code
    for kinds, say, code in _EXPLAINED:
        if isinstance(exc, kinds):
            return say(exc), code
    raise exc


_EXPLAINED: list[tuple[type[BaseException] | tuple[type[BaseException], ...], Callable[[Any], str], int]] = [
    (InvalidParameter, lambda e: f"invalid parameter {e.param}: {e.message}", EXIT_USAGE),
    ((JobNotFound, MalformedRecord), str, EXIT_NOT_FOUND),
    # kombu's: a Redis error met through Celery
    (
        (redis.ConnectionError, kombu.exceptions.OperationalError),
        lambda e: f"cannot reach Redis ({e}); check SVDQ_REDIS_URL",
        EXIT_UNAVAILABLE,
    ),
    (StorageUnavailable, lambda e: f"{e}; check SVDQ_STORAGE_URL and SVDQ_S3_ENDPOINT_URL", EXIT_UNAVAILABLE),
    (ConfigurationError, lambda e: f"configuration: {e}", EXIT_USAGE),
    (pydantic.ValidationError, lambda e: f"configuration: {settings_error(e)}", EXIT_USAGE),  # an SVDQ_* variable
    (KeyboardInterrupt, lambda e: "interrupted", EXIT_INTERRUPTED),
]
