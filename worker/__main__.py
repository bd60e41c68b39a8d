"""`python -m worker [celery worker options]`: what `svdq worker` runs."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from producer.contract import priority_queues
from worker.app import create_app
from worker.settings import WorkerSettings


def check_model(model: str) -> str | None:
    """A reason the model cannot load, found before any process forks; None if it looks loadable."""
    path = Path(model).expanduser()
    looks_local = model.startswith((".", "/", "~")) or path.exists()
    if looks_local and not (path / "model_index.json").is_file():
        return f"SVDQ_MODEL={model!r} is not a diffusers pipeline folder (no model_index.json)"
    return None


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    settings = WorkerSettings()
    problem = check_model(settings.model)
    if problem:
        sys.exit(f"svdq worker: {problem}. Build a test model with `svdq make-tiny-model DIR`.")
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s: %(levelname)s/%(processName)s] %(name)s: %(message)s")
    app = create_app(settings)
    # Our defaults first: later options on the command line override them.
    defaults = [
        "worker",
        "--loglevel=INFO",
        "--pool=prefork",
        "--concurrency=1",
        "--hostname=svdq@%h",
        f"--queues={','.join(priority_queues(settings.queue))}",
        "--task-events",
    ]
    app.worker_main([*defaults, *argv])


if __name__ == "__main__":
    main()
