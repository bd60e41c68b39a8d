"""A job's Celery message exactly as Celery's Redis transport stores it, for sending jobs without Celery.

Producers (`Client.submit`, `Client.submit_many`, the gateway) push each job's message in the script that
creates its record (producer.status): one round trip, and never a record without its message. Celery's
`send_task` costs about 1.3 ms a message on a 2-core machine (the argument reprs, a pooled connection and a
round trip). Built here: Celery's task message protocol 2 (headers, and a JSON body of args, kwargs and
embed) inside kombu's Redis envelope (base64 body, delivery info, a delivery tag), pushed onto the queue's list
as kombu's `_put` does. tests/integration/test_bulk.py checks these against what Celery itself writes, and
every job the tests render was sent this way.
"""

from __future__ import annotations

import base64
import functools
import json
import os
import re
import socket
import uuid
from typing import Any

from producer.contract import TASK_NAME

_EMBED = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
_ORIGIN = f"gen{os.getpid()}@{socket.gethostname()}"  # Celery's own (celery.utils.nodenames.anon_nodename)


def message(job_id: str, request: dict[str, Any], queue: str, reply_to: str = "", tag: str | None = None) -> str:
    """The JSON that `send_task(TASK_NAME, kwargs={"job_id", "request"}, task_id=job_id, queue=queue)` pushes;
    `tag`, its delivery tag (a uuid4's text), is drawn here unless given."""
    kwargs = {"job_id": job_id, "request": request}
    body = base64.b64encode(json.dumps([[], kwargs, _EMBED]).encode()).decode()
    parts = {"body": body, "id": job_id, "kwargsrepr": repr(kwargs), "tag": tag or str(uuid.uuid4())}
    # The envelope is the same for every job of a queue but for these parts: filled into its JSON, not dumped.
    pieces = _template(queue, reply_to)
    return "".join(_quoted(piece[1:], parts[piece[1:]]) if piece.startswith(_HOLE) else piece for piece in pieces)


def _quoted(name: str, value: str) -> str:
    return f'"{value}"' if name in ("body", "tag") else json.dumps(value)  # base64 and a uuid: nothing to escape


_HOLE = "\x00"  # marks a hole in the template: never in the envelope's own strings


@functools.lru_cache(maxsize=256)
def _template(queue: str, reply_to: str) -> tuple[str, ...]:
    """The envelope's JSON split around its holes: literal text, then _HOLE + a part's name, and so on."""
    hole = {name: _HOLE + name for name in ("body", "id", "kwargsrepr", "tag")}
    headers = {
        "lang": "py",
        "task": TASK_NAME,
        "id": hole["id"],
        "shadow": None,
        "eta": None,
        "expires": None,
        "group": None,
        "group_index": None,
        "retries": 0,
        "timelimit": [None, None],
        "root_id": hole["id"],
        "parent_id": None,
        "argsrepr": "()",
        "kwargsrepr": hole["kwargsrepr"],
        "origin": _ORIGIN,
        "ignore_result": None,
        "replaced_task_nesting": 0,
        "stamped_headers": None,
        "stamps": {},
    }
    properties = {
        "correlation_id": hole["id"],
        "reply_to": reply_to,
        "delivery_mode": 2,
        "delivery_info": {"exchange": "", "routing_key": queue},
        "priority": 0,
        "body_encoding": "base64",
        "delivery_tag": hole["tag"],
    }
    envelope = {
        "body": hole["body"],
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": headers,
        "properties": properties,
    }
    text = json.dumps(envelope)
    pattern = "|".join(re.escape(json.dumps(h)) for h in hole.values())
    pieces: list[str] = []
    for n, piece in enumerate(re.split(f"({pattern})", text)):
        pieces.append(_HOLE + json.loads(piece)[1:] if n % 2 else piece)
    return tuple(pieces)
