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
import json
import os
import socket
import uuid
from typing import Any

from producer.contract import TASK_NAME

_EMBED = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
_ORIGIN = f"gen{os.getpid()}@{socket.gethostname()}"  # Celery's own (celery.utils.nodenames.anon_nodename)


def kwargs_repr(kwargs: dict[str, Any]) -> str:
    """What Flower and Celery's logs show of a job's arguments (the message's `kwargsrepr`): all of them, except an
    image URL's query string, which in a presigned URL is a signature, a bearer credential for the image. The
    worker reads the arguments themselves."""
    request = kwargs.get("request")
    if isinstance(request, dict) and isinstance(image := request.get("image"), str) and "?" in image:
        kwargs = {**kwargs, "request": {**request, "image": image.split("?", 1)[0] + "?(query not shown)"}}
    return repr(kwargs)


def message(job_id: str, request: dict[str, Any], queue: str, tag: str | None = None) -> str:
    """The JSON that `send_task(TASK_NAME, kwargs={"job_id", "request"}, task_id=job_id, queue=queue)` pushes;
    `tag`, its delivery tag (a uuid4's text), is drawn here unless given. No reply_to: svdq keeps no results."""
    kwargs = {"job_id": job_id, "request": request}
    body = json.dumps([[], kwargs, _EMBED]).encode()
    headers = {
        "lang": "py",
        "task": TASK_NAME,
        "id": job_id,
        "shadow": None,
        "eta": None,
        "expires": None,
        "group": None,
        "group_index": None,
        "retries": 0,
        "timelimit": [None, None],
        "root_id": job_id,
        "parent_id": None,
        "argsrepr": "()",
        "kwargsrepr": kwargs_repr(kwargs),
        "origin": _ORIGIN,
        "ignore_result": None,
        "replaced_task_nesting": 0,
        "stamped_headers": None,
        "stamps": {},
    }
    properties = {
        "correlation_id": job_id,
        "reply_to": "",
        "delivery_mode": 2,
        "delivery_info": {"exchange": "", "routing_key": queue},
        "priority": 0,
        "body_encoding": "base64",
        "delivery_tag": tag or str(uuid.uuid4()),
    }
    return json.dumps(
        {
            "body": base64.b64encode(body).decode(),
            "content-encoding": "utf-8",
            "content-type": "application/json",
            "headers": headers,
            "properties": properties,
        }
    )
