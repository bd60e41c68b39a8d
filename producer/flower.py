"""`svdq flower`: Flower on the configured broker, and never without authentication unless asked.

Flower is Celery's own dashboard: workers online, tasks received/started/succeeded, from the events svdq
workers send. It refuses nobody by itself, so svdq requires basic auth (`SVDQ_FLOWER_BASIC_AUTH`, or Flower's
own `FLOWER_BASIC_AUTH`: `user:password[,user2:password2]`). Credentials and the broker URL reach Flower
through its environment, never its command line, where `ps` would show them.
"""

from __future__ import annotations

import importlib.util
import os
import sys

from producer.settings import Settings


class FlowerRefused(RuntimeError):
    pass


def flower_command(
    settings: Settings,
    port: int,
    *,
    address: str = "127.0.0.1",
    unsafe_no_auth: bool = False,
    extra: list[str] | None = None,
) -> tuple[list[str], dict[str, str]]:
    """The command line and environment that start Flower."""
    if importlib.util.find_spec("flower") is None:
        raise FlowerRefused("Flower is not installed here: `pip install '.[flower]'` in svdq's checkout")
    own = settings.flower_basic_auth.get_secret_value() if settings.flower_basic_auth else None
    auth = own or os.environ.get("FLOWER_BASIC_AUTH")
    if not auth and not unsafe_no_auth:
        raise FlowerRefused(
            "Flower would be open to anyone who can reach it: set SVDQ_FLOWER_BASIC_AUTH=user:password "
            "(or FLOWER_BASIC_AUTH), or pass --unsafe-no-auth on a network you trust"
        )
    # Celery's own broker variables would override the app's broker (SVDQ_REDIS_URL): Flower would watch another.
    env = {
        name: value
        for name, value in os.environ.items()
        if name != "SVDQ_FLOWER_BASIC_AUTH" and not name.startswith("CELERY_BROKER")
    }
    env["SVDQ_REDIS_URL"], env["SVDQ_SENTINEL_MASTER"] = settings.redis_url, settings.sentinel_master
    if auth:
        env["FLOWER_BASIC_AUTH"] = auth
    else:
        env.pop("FLOWER_BASIC_AUTH", None)
    argv = [sys.executable, "-m", "producer.flower", f"--port={port}", f"--address={address}", *(extra or [])]
    return argv, env


def protect_monitoring() -> None:
    """Flower answers /metrics and /healthcheck without asking for credentials (its other pages ask): with
    basic auth on, these ask too. Prometheus scrapes with `basic_auth` in its scrape config."""
    import tornado.web
    from flower.views import monitor

    for handler in (monitor.Metrics, monitor.Healthcheck):
        handler.get = tornado.web.authenticated(handler.get)  # type: ignore[method-assign]


def main(argv: list[str]) -> None:
    """`python -m producer.flower [flower options]`: Flower with every path behind its authentication."""
    from producer.client import producer_celery

    protect_monitoring()
    # svdq's app, not Celery's default one from CELERY_BROKER_URL: a Sentinel broker needs its master's name
    # (SVDQ_SENTINEL_MASTER) in the transport options, which no URL carries.
    sys.exit(producer_celery(Settings()).start(["flower", *argv]))


if __name__ == "__main__":
    main(sys.argv[1:])
