"""Inference over MQTT, the pure part: request topics, answer payloads, the binary-tensor property.

    request  {prefix}/models/{model}/infer  or  {prefix}/models/{model}/versions/{version}/infer
    answer   the OIP response (or {"error": "...", "status": N}) for the request's response topic

No paho, no I/O: agent.serving.mqtt is the adapter that uses these.
"""

from __future__ import annotations

import orjson

from agent.serving.http import Response

HEADER_LENGTH_PROPERTY = "inference-header-content-length"  # compared without case


def subscriptions(prefix: str) -> list[str]:
    """The topic filters of the inference requests under `prefix`."""
    return [f"{prefix}/models/+/infer", f"{prefix}/models/+/versions/+/infer"]


def infer_route(prefix: str, topic: str) -> tuple[str, str | None] | None:
    """(model, version or None) of a request topic; None when it is not one."""
    head = prefix + "/models/"
    if not topic.startswith(head):
        return None
    parts = topic[len(head) :].split("/")
    if len(parts) == 2 and parts[0] and parts[1] == "infer":
        return parts[0], None
    if len(parts) == 4 and parts[0] and parts[1] == "versions" and parts[2] and parts[3] == "infer":
        return parts[0], parts[2]
    return None


def error_payload(status: int, message: str) -> bytes:
    return orjson.dumps({"error": message, "status": status})


def answer_of(response: Response) -> tuple[bytes, int | None]:
    """The MQTT payload of a response of `App.infer`, and its JSON header length (binary outputs).

    Error responses carry `{"error": ...}`; the status is added, as MQTT has no status line.
    """
    if response.status == 200:
        header_length = None
        for name, value in response.extra or ():
            if name == b"inference-header-content-length":
                header_length = int(value)
        return response.body, header_length
    try:
        message = str(orjson.loads(response.body)["error"])
    except (orjson.JSONDecodeError, KeyError, TypeError):
        message = response.body.decode("utf-8", "replace")
    return error_payload(response.status, message), None


def header_length_of(user_properties: list[tuple[str, str]]) -> int | None:
    """The request's `Inference-Header-Content-Length` user property; RequestError-worthy ValueError
    when it is not a non-negative integer."""
    for name, value in user_properties:
        if name.lower() == HEADER_LENGTH_PROPERTY:
            if not value.isascii() or not value.isdigit():
                raise ValueError("Inference-Header-Content-Length must be a non-negative integer")
            return int(value)
    return None


__all__ = [
    "HEADER_LENGTH_PROPERTY",
    "answer_of",
    "error_payload",
    "header_length_of",
    "infer_route",
    "subscriptions",
]
