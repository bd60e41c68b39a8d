"""No job and no ping before the model is loaded.

Celery's main process starts consuming as soon as it has forked its pool process, while that process is still
loading the model in `worker_process_init` (minutes for a real checkpoint). It would take a message off the
queue and hold it through the load while warm workers idle, and answer pings, so compose's healthcheck called
a loading worker healthy. This consumer step holds the consumer's start (the event loop that fetches messages
and answers pings comes after every step) until the pool process says its model is loaded, or why not.

It also keeps a worker from taking a message while a replaced pool process loads the model again.

It owns SVDQ_LOAD_TIMEOUT on the first start: a load that takes longer, or a loading process that dies
(killed for memory), ends the worker with exit 3 and the reason, where Celery's own timer would kill the
process and start another load, for ever, with a job held.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from collections.abc import Callable, Iterable
from typing import Any, Protocol

import redis
from celery import bootsteps
from celery.concurrency.prefork import TaskPool
from celery.exceptions import WorkerShutdown
from celery.worker import state

from producer.client import connect_redis
from producer.fleet import LOADING_TTL, FleetStore
from worker import timelimit
from worker.settings import WorkerSettings
from worker.startup import LOAD_FAILED, LoadFailure, report_to_presence, whoami

log = logging.getLogger(__name__)


class Child(Protocol):
    pid: int | None

    @property
    def exitcode(self) -> int | None: ...


def how_it_ended(exitcode: int) -> str:
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:  # a real-time signal has no name
            name = f"signal {-exitcode}"
        hint = " (out of memory?)" if -exitcode == signal.SIGKILL else ""
        return f"was killed by {name}{hint}"
    return f"exited with status {exitcode}"


def _kill(children: Iterable[Child]) -> None:
    for child in children:
        with contextlib.suppress(ProcessLookupError, TypeError):
            os.kill(child.pid, signal.SIGKILL)  # type: ignore[arg-type]


def wait_for_model(
    failure: LoadFailure,
    children: Callable[[], Iterable[Child]],
    timeout: float,
    stopping: Callable[[], bool],
    stopped: Callable[[], None],
    waiting: Callable[[], None] = lambda: None,
) -> None:
    """Return once the pool process has loaded the model; WorkerShutdown(3) with the reason kept in `failure`
    when it cannot load. Asked to stop meanwhile, `stopped` (which raises Celery's shutdown) after ending the load:
    it holds no job, and the pool would otherwise wait for the load to finish before it stops. `waiting` is
    called at each look (every 0.2 s)."""
    deadline = time.monotonic() + timeout
    while not failure.loaded():
        if failure.read() is not None:  # the pool process said why; the worker's main() prints it last
            raise WorkerShutdown(LOAD_FAILED)
        if stopping():
            _kill(children())
            stopped()
            return
        ended = [child.exitcode for child in children()]
        if ended and all(code is not None for code in ended):
            failure.record(f"the process loading the model {how_it_ended(ended[0] or 0)}")
            raise WorkerShutdown(LOAD_FAILED)
        if time.monotonic() > deadline:
            failure.record(
                f"the model was not loaded within SVDQ_LOAD_TIMEOUT={timeout:g}s; a first start that downloads or "
                "compiles a real checkpoint can take longer: raise SVDQ_LOAD_TIMEOUT"
            )
            _kill(children())
            raise WorkerShutdown(LOAD_FAILED)
        waiting()
        time.sleep(0.2)


def _hold_while_reloading(c: Any) -> None:
    """No message while a replaced pool process (killed by the hard time limit, or for memory) loads the model
    again: one taken then waited out the load in this worker, where an idle worker could have run it. Celery's
    prefork pool lists a process as waiting to start until its initializer (the model's load) has returned; a
    process the time limit is killing holds messages off until it is gone (its replacement is listed then).

    kombu asks before each wait for a message, so a wait already under way when a process dies (an idle worker's)
    still takes the next one."""
    pool = getattr(c.pool, "_pool", None)
    waiting = getattr(pool, "_waiting_to_start", None)
    qos = getattr(getattr(c.task_consumer, "channel", None), "qos", None)
    if waiting is None or qos is None:  # another pool, or a transport without kombu's QoS: nothing to hold
        return
    inner = qos.can_consume  # Celery's own (worker_disable_prefetch), put back at each consumer start
    killed = timelimit.HARD.killed

    def can_consume() -> bool:
        if waiting:
            return False
        if killed:
            killed.intersection_update(p.pid for p in pool._pool)  # gone: its replacement is `waiting` now
            if killed:
                return False
        return bool(inner())

    qos.can_consume = can_consume


def announce(settings: WorkerSettings, what: str, write: Callable[[FleetStore], None], quiet: bool = False) -> None:
    """Best effort: a Redis away at start-up must not stop the load (the node's own start waits for it)."""
    try:
        client = connect_redis(settings, retry_for=1)
        try:
            write(FleetStore(client))
        finally:
            client.close()
    except redis.RedisError as exc:
        log.log(logging.DEBUG if quiet else logging.WARNING, "could not %s in Redis: %s", what, exc)


def gate(settings: WorkerSettings) -> type[bootsteps.StartStopStep]:
    """The consumer step, for a worker whose loads may take SVDQ_LOAD_TIMEOUT seconds."""
    load_timeout = settings.load_timeout

    class ModelGate(bootsteps.StartStopStep):
        label = "model gate"
        requires = ("celery.worker.consumer.tasks:Tasks",)
        opened = False  # once: a consumer restarted after a broker outage has long had its model

        def start(self, c: Any) -> None:
            _hold_while_reloading(c)
            failure = LoadFailure.from_env()
            # Solo and thread pools load in this process, at the first job.
            if ModelGate.opened or failure is None or not isinstance(c.pool, TaskPool):
                return
            log.info("waiting for the model to load before taking jobs (SVDQ_LOAD_TIMEOUT=%gs)", load_timeout)
            queues = sorted(q.name for q in c.task_consumer.queues)
            model, renewed = settings.served_model(), time.monotonic()
            announce(
                settings,
                "list this worker as loading",
                lambda fleet: fleet.loading(c.hostname, model, queues, owner=whoami()),
            )

            def still_loading() -> None:
                nonlocal renewed
                if time.monotonic() - renewed >= LOADING_TTL / 3:
                    renewed = time.monotonic()
                    announce(settings, "renew the loading presence", lambda f: f.still_loading(c.hostname), quiet=True)

            try:
                wait_for_model(
                    failure,
                    children=lambda: list(c.pool._pool._pool),
                    timeout=load_timeout,
                    stopping=lambda: state.should_stop is not None or state.should_terminate is not None,
                    stopped=state.maybe_shutdown,
                    waiting=still_loading,
                )
            except BaseException:
                if (message := failure.read()) is not None:  # not a stop asked for while loading
                    log.critical("svdq worker stops: the model failed to load: %s", message)
                    redis_client = connect_redis(settings, retry_for=1)
                    report_to_presence(redis_client, c.hostname, model, message)
                else:  # stopped while loading: no longer a worker about to read its queues
                    announce(settings, "take this worker off the loading list", lambda f: f.gone(c.hostname))
                raise
            ModelGate.opened = True

    return ModelGate
