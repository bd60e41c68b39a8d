"""`python -m worker [--gpus all|0,1] [--model M] [--model-name N] [celery worker options]`: `svdq worker`."""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
from pathlib import Path

from producer.contract import MODEL_NAME_PATTERN, worker_queues
from worker.settings import WorkerSettings


def check_model(model: str) -> str | None:
    """A reason the model cannot load, found before any process forks; None if it looks loadable."""
    path = Path(model).expanduser()
    looks_local = model.startswith((".", "/", "~")) or path.exists()
    if looks_local and not (path / "model_index.json").is_file():
        return f"SVDQ_MODEL={model!r} is not a diffusers pipeline folder (no model_index.json)"
    return None


def svdq_options(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """svdq's own options; everything else is for `celery worker`."""
    parser = argparse.ArgumentParser(prog="svdq worker", add_help=False)
    parser.add_argument("--gpus", help="all, or GPU indices like 0,1,3: one supervised worker per GPU")
    parser.add_argument("--model", help="hub id or local folder (sets SVDQ_MODEL)")
    parser.add_argument("--model-name", help="the name jobs use to ask for this model (sets SVDQ_MODEL_NAME)")
    return parser.parse_known_args(argv)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    ours, rest = svdq_options(argv)
    # Options become settings (and reach supervised children through the environment).
    if ours.model:
        os.environ["SVDQ_MODEL"] = ours.model
    if ours.model_name:
        os.environ["SVDQ_MODEL_NAME"] = ours.model_name
    settings = WorkerSettings()
    problem = check_model(settings.model)
    if not problem and not re.fullmatch(MODEL_NAME_PATTERN, settings.served_model()):
        problem = f"model name {settings.served_model()!r} must be lowercase letters, digits, - and _"
    if problem:
        sys.exit(f"svdq worker: {problem}. Build a test model with `svdq make-tiny-model DIR`.")
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s: %(levelname)s/%(processName)s] %(name)s: %(message)s")
    if ours.gpus:
        from worker.supervisor import NoGPU, supervise

        try:
            sys.exit(supervise(ours.gpus, rest))
        except NoGPU as exc:
            print(f"svdq worker: {exc}", file=sys.stderr)
            sys.exit(2)

    from worker.app import create_app

    app = create_app(settings)
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
    app.worker_main([*defaults, *rest])


if __name__ == "__main__":
    main()
