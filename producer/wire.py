"""A job's Celery message exactly as Celery's Redis transport stores it, for sending jobs without Celery.

`Client.submit` sends through Celery (`send_task`), about 1.3 ms a message on a 2-core machine: the argument
reprs, a pooled connection and a round trip per message. `Client.submit_many` and the gateway push each job's
message in the script that creates its record instead (producer.status), built here: Celery's task message
protocol 2 (headers, and a JSON body of args, kwargs and embed) inside kombu's Redis envelope (base64 body,
delivery info, a delivery tag), pushed onto the queue's list as kombu's `_put` does.
tests/integration/test_bulk.py checks these against what Celery itself writes, and renders jobs sent this way
on a real worker.
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


def message(job_id: str, request: dict[str, Any], queue: str, reply_to: str = "") -> str:
    """The JSON that `send_task(TASK_NAME, kwargs={"job_id", "request"}, task_id=job_id, queue=queue)` pushes."""
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
        "kwargsrepr": repr(kwargs),
        "origin": _ORIGIN,
        "ignore_result": None,
        "replaced_task_nesting": 0,
        "stamped_headers": None,
        "stamps": {},
    }
    properties = {
        "correlation_id": job_id,
        "reply_to": reply_to,
        "delivery_mode": 2,
        "delivery_info": {"exchange": "", "routing_key": queue},
        "priority": 0,
        "body_encoding": "base64",
        "delivery_tag": str(uuid.uuid4()),
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
