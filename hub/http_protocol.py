"""uvicorn's httptools HTTP/1.1 protocol with a bound on the bytes of a request's head.

    uvicorn.run(app, http=bounded_httptools(settings.max_header_bytes))

Why: `outpost-hub serve` ran on uvicorn's h11 protocol because h11 bounds the request line and
headers it buffers (`h11_max_incomplete_event_size`; beyond it, 400 and the connection closed),
while uvicorn's httptools protocol accepts a head of any size into memory (llhttp has no limit
and httptools collects a header's pieces until it ends). But h11 is pure Python: a device's
poll cost the hub about three times the CPU on h11 than on httptools (fleet_sim --phases polls,
167 against 51-57 us per poll with the TUF files answered ahead of the middleware).

The bound, as h11 keeps it: bytes received while a request's head is incomplete are counted;
when they pass `max_head_bytes` and the head is still not complete, the answer is 400 and the
connection is closed. A head that completes within the data read at once is accepted, as h11
does, so what a connection can make the hub hold is the bound plus at most two reads (a read is
at most 256 KiB). The count starts again when a head completes, so a body (an upload) is never
counted, and bytes of a previous pipelined request are never counted against the next
(its head may be undercounted by one read, never overcounted).

It relies on uvicorn's `HttpToolsProtocol` (`data_received` feeding the parser, the parser's
`on_headers_complete` and `on_message_complete` callbacks, `send_400_response`), which
tests/hub/test_api_limits.py exercises through the real `outpost-hub serve`.
"""

from __future__ import annotations

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

DEFAULT_MAX_HEAD_BYTES = 16 * 1024  # h11's default bound, which `serve` used to rely on


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    """One connection; `max_head_bytes` is set by `bounded_httptools`."""

    max_head_bytes = DEFAULT_MAX_HEAD_BYTES
    _awaiting_head = True  # between requests or inside a head: bytes count against the bound
    _head_bytes = 0

    def data_received(self, data: bytes) -> None:
        if self.transport.is_closing():
            return  # refused already: the rest is not parsed
        if self._awaiting_head:
            self._head_bytes += len(data)
        super().data_received(data)
        if self._awaiting_head and self._head_bytes > self.max_head_bytes and not self.transport.is_closing():
            self.logger.warning("Request line and headers over %d bytes: refused.", self.max_head_bytes)
            self.send_400_response("Request line and headers too large.")

    def on_headers_complete(self) -> None:
        self._awaiting_head = False
        self._head_bytes = 0
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._awaiting_head = True
        super().on_message_complete()


def bounded_httptools(max_head_bytes: int) -> type[BoundedHttpToolsProtocol]:
    """The protocol class for uvicorn's `http=`, bounding each request's head at `max_head_bytes`."""
    if max_head_bytes < 1:
        raise ValueError("max_head_bytes must be at least 1")
    return type("BoundedHttpToolsProtocol", (BoundedHttpToolsProtocol,), {"max_head_bytes": max_head_bytes})
