"""Routes of the agent's socket API: the Open Inference Protocol v2 and Outpost's additions.

    GET  /v2/health/live | /v2/health/ready | /v2
    GET  /v2/models/{m}[/versions/{v}]           model metadata
    GET  /v2/models/{m}[/versions/{v}]/ready     model ready
    POST /v2/models/{m}[/versions/{v}]/infer     inference (JSON or binary tensors)
    GET  /v1/status        agent, models, versions, connections
    GET  /metrics          Prometheus text format
    POST /v1/reload        load versions newly installed in the store
    POST /v1/models/{m}/default   {"version": N} pins the default version; null unpins
    POST /v1/feedback      {"id": "<prediction id>", "label": ...} ground truth for a prediction

Access control is the socket's file mode and group: whoever may connect may use
every route, as with the Docker socket.

The infer path avoids coroutines: decoding runs at once on the event loop, the
batcher's future gets a callback that encodes the answer, and the protocol
writes it when that future completes.

With a version's response cache on (agent.runtime.cache), a request whose inputs it answered
within the time window is answered from the cache at the end of the loop iteration, with the other
hits of the same read burst: a new prediction id, the same outputs, the version that stored them;
the batcher and onnxruntime are skipped. Such a hit is
still a request of that version: it is in the metrics and the monitor's window (requests,
latency, feature and prediction counts, so drift sees its inputs), its id can be scored by
feedback, and capture may sample it. It sends no shadow copy (the copy would cost the model run
the cache saved). While a version is on probation (`lv.observer` set) its cache is filled but
not read, so probation judges the model itself. Requests whose `parameters` hold anything but
`binary_data_output` and `key` (which do not change the outputs) bypass the cache.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import TYPE_CHECKING, Any, Final

import numpy as np
import orjson

from agent import __version__
from agent.errors import AgentError, NotFound, RequestError
from agent.metrics import Metrics
from agent.runtime.batcher import BatchArrays, BatchOutputs, Tensors, outcome_of
from agent.runtime.cache import ResponseCache, input_key, metric_families
from agent.runtime.registry import LoadedVersion, ModelRegistry
from agent.serving.http import Deferred, Request, Response, error_response, json_response
from agent.serving.jsonrows import JsonRows
from agent.serving.oip import InferRequest, decode_infer_request, encode_infer_response

if TYPE_CHECKING:  # experiments are imported when one starts (agent.update.runner)
    from agent.runtime.experiment import ExperimentRoute

log = logging.getLogger(__name__)
# Bound once (Final: a C static when compiled): `time.perf_counter()` looks the attribute up per call.
_perf_counter: Final = time.perf_counter

SERVER_NAME = "outpost-agent"
MAX_CACHED_PATHS = 1024  # bounded: paths come from clients
EXTENSIONS = ["binary_tensor_data"]
_OK_EMPTY_LIVE = Response(200, b'{"live":true}')
_OK_EMPTY_READY = Response(200, b'{"ready":true}')
_BINARY_CT = b"application/octet-stream"
SHADOW_ID_SUFFIX = "~shadow"  # the candidate's prediction of a shadow copy is filed under id + this
# Request parameters that leave the outputs as they are: requests with only these may be cached.
CACHE_NEUTRAL_PARAMETERS = frozenset({"binary_data_output", "key"})

AdminHook = Callable[[], Awaitable[dict[str, Any]]]


def _runtime_status(exc: BaseException) -> tuple[int, str]:
    """Map an onnxruntime failure to a status.

    Requests reach onnxruntime only after their names, datatypes and shapes were checked
    against the signature, so a failure while a node runs is the model's (500, and it counts
    against a version on probation); an invalid argument onnxruntime finds before running
    (a dimension the signature leaves open) is the caller's (400).
    """
    text = str(exc)
    if "while running" in text:
        return 500, f"the model failed on this input: {text}"
    if type(exc).__name__ in ("InvalidArgument", "InvalidGraph") or "INVALID_ARGUMENT" in text:
        return 400, f"the model rejected the input: {text}"
    return 500, f"inference failed: {text}"


class _InferTicket(Deferred):
    """Carries one inference from the batcher back to its connection, encoding the answer; it is
    itself the Deferred the connection waits on (one object per request rather than two)."""

    __slots__ = (
        "cache_key",
        "lv",
        "parsed",
        "prediction_id",
        "prediction_seq",
        "shadow",
        "started",
    )

    def __init__(
        self,
        lv: LoadedVersion,
        parsed: InferRequest,
        started: float,
        prediction: tuple[str, int],
        shadow: ExperimentRoute | None = None,
        cache_key: bytes | None = None,
    ) -> None:
        super().__init__()
        self.lv = lv
        self.parsed = parsed
        self.started = started
        self.shadow = shadow  # a shadow experiment that may get a copy once this is answered
        self.cache_key = cache_key  # the answer goes into lv.cache under this key
        # The response's `id` and the agent's counter for it (-1 when the request chose the id):
        # the monitor files predictions by them (App._prediction_id).
        self.prediction_id, self.prediction_seq = prediction

    def deliver(
        self, outcome: Tensors | BaseException | None, batch: BatchOutputs | None, start: int, count: int
    ) -> None:
        self.resolve(self._respond(outcome, batch, start, count))
        route = self.shadow
        if route is not None and not isinstance(outcome, BaseException) and route.shadow_wanted():
            # After the answer: the copy runs on the candidate's batcher, its result only compared.
            primary = outcome_of(outcome, batch, start, count)
            assert not isinstance(primary, BaseException)
            arm = route.arm
            shadow = _ShadowTicket(arm, primary, self.prediction_id + SHADOW_ID_SUFFIX)
            arm.batcher.submit_ticket(self.parsed.inputs, self.parsed.rows, shadow)

    def _respond(
        self, given: Tensors | BaseException | None, batch: BatchOutputs | None, start: int, count: int
    ) -> Response:
        lv = self.lv
        vm = lv.metrics
        outcome = given
        if isinstance(outcome, BaseException):
            vm.failed()
            status, message = _runtime_status(outcome)
            if status == 500:  # the model failed, not the caller
                log.error("%s version %d: %s", lv.name, lv.version, message)
                elapsed = time.perf_counter() - self.started
                if lv.observer is not None:
                    lv.observer(False, elapsed)
                if lv.monitor is not None:
                    lv.monitor.record_failure()
            return error_response(status, message)
        parsed = self.parsed
        try:
            body: bytes | None = None
            header_len: int | None = None
            if batch is not None and parsed.outputs is None and not parsed.binary_output:
                # All JSON, and rows of a batch: cut from the batch's text, rendered once.
                rendered = batch.rendered
                if not isinstance(rendered, JsonRows):
                    rendered = batch.rendered = JsonRows(lv.name, lv.version_str, batch.arrays)
                body = rendered.answer(self.prediction_id, start, count)
            if body is None:
                if outcome is None:  # rows of a shared call, cut out only now that they are needed
                    assert batch is not None
                    outcome = batch.rows(start, count)
                body, header_len = encode_infer_response(
                    lv.name, lv.version_str, self.prediction_id, outcome, parsed.outputs, parsed.binary_output
                )
        except Exception as err:
            vm.failed()
            log.error("%s version %d: could not encode the response: %r", lv.name, lv.version, err)
            return error_response(500, f"could not encode the response: {err}")
        elapsed = _perf_counter() - self.started
        vm.answered(elapsed)
        if lv.observer is not None:
            lv.observer(True, elapsed)
        if self.cache_key is not None and lv.cache is not None:
            if outcome is None:
                assert batch is not None
                outcome = batch.rows(start, count)
            lv.cache.put(self.cache_key, outcome)
        return _ok(body, header_len)


def _ok(body: bytes, header_len: int | None) -> Response:
    if header_len is None:
        return Response(200, body)
    return Response(200, body, _BINARY_CT, [(b"inference-header-content-length", b"%d" % header_len)])


def _joined(items: list[_CacheHit], outs: list[Tensors]) -> BatchArrays | None:
    """The hits' inputs and outputs joined along the rows, as one batch; None when they do not fit
    together (then the monitor takes them one by one). One version's requests have the same input
    names and datatypes (checked against its signature) and its cached answers the same outputs,
    so only the dimensions can differ: numpy refuses to join those, and the row count is checked."""
    if len(items) == 1:
        return items[0].inputs, outs[0]
    rows = sum(i.size for i in items)
    try:
        inputs = {k: np.concatenate([i.inputs[k] for i in items]) for k in items[0].inputs}
        outputs = {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}
    except (ValueError, KeyError):
        return None
    if any(a.shape[0] != rows for a in (*inputs.values(), *outputs.values())):
        return None
    return inputs, outputs


class _CacheHit:
    """A request answered from the cache, as the monitor's batch observer sees a request (a
    `BatchItem` that is its own ticket): its inputs, rows and prediction id."""

    __slots__ = ("inputs", "prediction_id", "prediction_seq", "size")
    cancelled = False

    def __init__(self, inputs: Tensors, rows: int, prediction_id: str, prediction_seq: int) -> None:
        self.inputs = inputs
        self.size = max(rows, 1)
        self.prediction_id = prediction_id
        self.prediction_seq = prediction_seq

    @property
    def ticket(self) -> _CacheHit:
        return self

    def deliver(
        self, outcome: Tensors | BaseException | None, batch: BatchOutputs | None, start: int, count: int
    ) -> None:  # answered already: nothing to do
        pass


class _ShadowTicket:
    """A copy of an answered request for a shadow experiment's candidate: counted, compared, dropped."""

    __slots__ = ("arm", "prediction_id", "primary", "started")
    cancelled = False
    prediction_seq = -1

    def __init__(self, arm: LoadedVersion, primary: Tensors, prediction_id: str) -> None:
        self.arm = arm
        self.primary = primary
        self.prediction_id = prediction_id
        self.started = time.perf_counter()

    def deliver(
        self, given: Tensors | BaseException | None, batch: BatchOutputs | None, start: int, count: int
    ) -> None:
        arm = self.arm
        monitor = arm.monitor
        outcome = outcome_of(given, batch, start, count)
        if isinstance(outcome, BaseException):
            arm.metrics.failed()
            if monitor is not None:
                monitor.record_failure()
            return
        arm.metrics.answered(time.perf_counter() - self.started)
        if monitor is not None:
            from agent.runtime.experiment import agreement  # loaded already: the experiment is

            # Raising here would end the batcher's delivery loop: the requests batched after this
            # copy (clients of the candidate's version) would never get their answers.
            try:
                compared, agreed = agreement(self.primary, outcome)
            except Exception as exc:
                log.debug("%s version %d: shadow answer not compared: %r", arm.name, arm.version, exc)
                compared = agreed = 0
            monitor.add_shadow(compared, agreed)


class App:
    def __init__(
        self,
        registry: ModelRegistry,
        metrics: Metrics,
        *,
        status_info: Callable[[], dict[str, Any]],
        reload: AdminHook | None = None,
        update: AdminHook | None = None,
        feedback: Callable[[Any, Any], dict[str, Any]] | None = None,
    ) -> None:
        self.registry = registry
        self.metrics = metrics
        self._status_info = status_info
        self._reload = reload
        self._update = update
        self._feedback = feedback
        self.started = False  # set once start-up loading has finished
        # Prediction ids: a random per-boot prefix and a counter, unique across
        # restarts without the cost of a uuid per request.
        self.id_prefix = os.urandom(4).hex() + "-"
        self._seq = 0  # the last id's counter
        self._infer_paths: dict[str, tuple[str, str | None]] = {}
        metrics.collectors.append(self._cache_metrics)
        # Cache hits of this loop iteration, answered together at its end (_answer_hits).
        self._hits: list[tuple[Deferred, LoadedVersion, InferRequest, Tensors, float]] = []

    # -- dispatch -----------------------------------------------------------------------------

    def handle(self, req: Request) -> Response | Deferred | asyncio.Future[Response]:
        try:
            # Inference paths seen before skip the general router: the parse of a
            # path never changes, only what the registry answers for it.
            known = self._infer_paths.get(req.path)
            if known is not None and req.method == "POST":
                return self._infer(req, known[0], known[1])
            return self._route(req)
        except AgentError as exc:
            status = getattr(exc, "status", 500)
            return error_response(status, str(exc))

    def _route(self, req: Request) -> Response | Deferred | asyncio.Future[Response]:
        method = req.method
        parts = req.path.strip("/").split("/")
        if parts[0] == "v2":
            if len(parts) >= 3 and parts[1] == "models":
                return self._model_route(req, parts)
            if len(parts) == 1:
                self._only(method, "GET")
                return json_response(
                    200, {"name": SERVER_NAME, "version": __version__, "extensions": EXTENSIONS}
                )
            if len(parts) == 3 and parts[1] == "health":
                self._only(method, "GET")
                if parts[2] == "live":
                    return _OK_EMPTY_LIVE
                if parts[2] == "ready":
                    if self.started and self.registry.any_ready():
                        return _OK_EMPTY_READY
                    return Response(503, b'{"ready":false}')
        elif parts[0] == "v1":
            return self._outpost_route(req, parts)
        elif parts == ["metrics"]:
            self._only(method, "GET")
            text, content_type = self.metrics.render()
            return Response(200, text, content_type.encode())
        raise NotFound(f"no route for {req.path}")

    @staticmethod
    def _only(method: str, *allowed: str) -> None:
        if method not in allowed and not (method == "HEAD" and "GET" in allowed):
            raise RequestError(f"method {method} is not allowed here; use {' or '.join(allowed)}")

    def _model_route(self, req: Request, parts: list[str]) -> Response | Deferred | asyncio.Future[Response]:
        # parts: v2 models {m} [versions {v}] [ready|infer]
        name = parts[2]
        rest = parts[3:]
        version: str | None = None
        if len(rest) >= 2 and rest[0] == "versions":
            version = rest[1]
            rest = rest[2:]
        if not rest:
            self._only(req.method, "GET")
            lv = self.registry.get(name, version)
            return json_response(200, lv.metadata(self.registry.versions(name)))
        if rest == ["infer"]:
            self._only(req.method, "POST")
            if len(self._infer_paths) < MAX_CACHED_PATHS:
                self._infer_paths[req.path] = (name, version)
            return self._infer(req, name, version)
        if rest == ["ready"]:
            self._only(req.method, "GET")
            try:
                self.registry.get(name, version)
            except AgentError as exc:
                if isinstance(exc, NotFound):
                    raise
                return Response(503, orjson.dumps({"ready": False, "error": str(exc)}))
            return _OK_EMPTY_READY
        raise NotFound(f"no route for {req.path}")

    # -- inference ----------------------------------------------------------------------------

    def _infer(self, req: Request, name: str, version: str | None) -> Response | Deferred:
        header = req.headers.get(b"inference-header-content-length")
        if header is not None and not header.isdigit():
            raise RequestError("Inference-Header-Content-Length must be a non-negative integer")
        return self.infer(name, version, req.body, int(header) if header is not None else None)

    def infer(
        self, name: str, version: str | None, body: bytes, header_length: int | None
    ) -> Response | Deferred:
        """One inference request, whatever carried it (the socket, MQTT): the same validation,
        batching, prediction ids and monitoring for every transport.

        `body` is the OIP request (JSON, or a JSON header of `header_length` bytes followed by
        binary tensors). Raises AgentError (RequestError 4xx, NotFound 404, Unavailable 503)
        for what fails at once; otherwise returns the Deferred the answer will resolve (a 200
        Response, or an error Response when the model fails). On the loop thread only.
        """
        lv = self.registry.defaults.get(name) if version is None else None
        if lv is None:
            lv = self.registry.get(name, version)  # a version asked for, or the error to raise
        started = _perf_counter()
        try:
            parsed = decode_infer_request(
                body,
                header_length,
                lv.session.input_map,
                lv.session.outputs,
            )
        except RequestError:
            lv.metrics.failed()
            raise
        shadow = None
        if version is None and self.registry.experiments:
            route = self.registry.experiments.get(name)
            if route is not None:
                if route.mode == "shadow":
                    shadow = route
                elif route.picks_arm(parsed.parameters.get("key")):
                    lv = route.arm  # the same signature: checked when the experiment started
        key = None
        cache = lv.cache  # after the routing: the cache of the version that answers
        if cache is not None:
            params = parsed.parameters
            if not params or params.keys() <= CACHE_NEUTRAL_PARAMETERS:
                key = input_key(parsed.inputs)
                if lv.observer is None:
                    outputs = cache.get(key)
                    if outputs is not None:
                        return self._answer_cached(lv, parsed, outputs, started)
                else:  # on probation: the model answers (and fills the cache)
                    cache.bypassed += 1
            else:
                cache.bypassed += 1
        ticket = _InferTicket(lv, parsed, started, self._prediction_id(parsed), shadow, key)
        lv.batcher.submit_ticket(parsed.inputs, parsed.rows, ticket)
        return ticket

    def _answer_cached(
        self, lv: LoadedVersion, parsed: InferRequest, outputs: Tensors, started: float
    ) -> Deferred:
        """A cache hit, answered like the model's answer (a new prediction id, counted) at the end
        of this loop iteration, together with the other hits of the same read burst, as the inline
        batcher answers a batch: answering each hit at once made the agent and its clients trade
        one request per wake-up (over the socket, 16 clients got half the throughput), and observing
        hits one by one cost more than the model run they saved."""
        deferred = Deferred()
        if not self._hits:
            asyncio.get_running_loop().call_soon(self._answer_hits)
        self._hits.append((deferred, lv, parsed, outputs, started))
        return deferred

    def _answer_hits(self) -> None:
        hits, self._hits = self._hits, []
        observed: dict[int, tuple[LoadedVersion, list[_CacheHit], list[Tensors]]] = {}  # by id(lv)
        now = time.monotonic()
        for deferred, lv, parsed, outputs, started in hits:
            # A version that answers from its cache is in use: the memory budget's LRU clock, which
            # the batcher keeps for the requests it runs (agent.runtime.budget).
            lv.batcher.last_used = now
            prediction_id, seq = self._prediction_id(parsed)
            vm = lv.metrics
            try:
                body, header_len = encode_infer_response(
                    lv.name, lv.version_str, prediction_id, outputs, parsed.outputs, parsed.binary_output
                )
            except Exception as err:
                vm.failed()
                log.error("%s version %d: could not encode the response: %r", lv.name, lv.version, err)
                deferred.resolve(error_response(500, f"could not encode the response: {err}"))
                continue
            vm.answered(time.perf_counter() - started)
            deferred.resolve(_ok(body, header_len))
            if lv.batcher.observer is not None:
                _, items, outs = observed.setdefault(id(lv), (lv, [], []))
                items.append(_CacheHit(parsed.inputs, parsed.rows, prediction_id, seq))
                outs.append(outputs)
        for lv, items, outs in observed.values():
            observer = lv.batcher.observer
            if observer is None:
                continue
            # After the answers, as the batcher hands over a batch: the monitor (and capture) see
            # the hits as one batch, with its arrays joined when every hit's tensors fit together.
            try:
                observer(items, outs, _joined(items, outs))
            except Exception:  # the monitor's failure is its own, as in the batcher
                log.exception("batch observer failed")

    def _cache_metrics(self) -> Iterator[Any]:
        caches: list[ResponseCache] = [lv.cache for lv in self.registry.all_loaded() if lv.cache is not None]
        if caches:
            yield from metric_families(caches)

    def _prediction_id(self, parsed: InferRequest) -> tuple[str, int]:
        """The response's `id`: the request's (and -1), or the next of the agent's own and its
        counter. The monitor files predictions by the id, the agent's own by their counter."""
        if parsed.id is not None:
            return parsed.id, -1
        # A native counter and %-formatting: next() on itertools.count and an f-string's
        # format spec cost twice as much, once per request.
        self._seq += 1
        seq = self._seq
        return self.id_prefix + "%x" % seq, seq  # noqa: UP031 (the fastest of the three)

    # -- Outpost additions --------------------------------------------------------------------

    def _outpost_route(self, req: Request, parts: list[str]) -> Response | asyncio.Future[Response]:
        if parts == ["v1", "status"]:
            self._only(req.method, "GET")
            return json_response(200, self.status())
        if parts == ["v1", "reload"]:
            self._only(req.method, "POST")
            if self._reload is None:
                raise NotFound("reload is not available")
            return asyncio.ensure_future(self._admin(self._reload))
        if parts == ["v1", "update"]:
            self._only(req.method, "POST")
            if self._update is None:
                raise NotFound("updates are not available")
            return asyncio.ensure_future(self._admin(self._update))
        if parts == ["v1", "feedback"]:
            self._only(req.method, "POST")
            return self._label(req.body)
        if len(parts) == 4 and parts[1] == "models" and parts[3] == "default":
            self._only(req.method, "POST", "PUT")
            return self._pin(parts[2], req.body)
        raise NotFound(f"no route for {req.path}")

    async def _admin(self, hook: AdminHook) -> Response:
        try:
            return json_response(200, await hook())
        except AgentError as exc:
            return error_response(getattr(exc, "status", 500), str(exc))

    def _label(self, body: bytes) -> Response:
        if self._feedback is None:
            raise NotFound("feedback is off: monitor.enabled is false in the config")
        try:
            doc = orjson.loads(body or b"{}")
        except orjson.JSONDecodeError as exc:
            raise RequestError(f"body is not valid JSON: {exc}") from None
        if not isinstance(doc, dict) or "id" not in doc or "label" not in doc:
            raise RequestError('body must be {"id": "<prediction id>", "label": <label, or a list per row>}')
        return json_response(200, self._feedback(doc["id"], doc["label"]))

    def _pin(self, name: str, body: bytes) -> Response:
        try:
            doc = orjson.loads(body or b"{}")
        except orjson.JSONDecodeError as exc:
            raise RequestError(f"body is not valid JSON: {exc}") from None
        if not isinstance(doc, dict) or "version" not in doc:
            raise RequestError('body must be {"version": N} or {"version": null}')
        version = doc["version"]
        if version is not None and (not isinstance(version, int) or isinstance(version, bool)):
            raise RequestError("version must be an integer or null")
        lv = self.registry.pin(name, version)
        return json_response(200, {"name": name, "default_version": lv.version, "pinned": version})

    def status(self) -> dict[str, Any]:
        doc = self._status_info()
        doc["ready"] = self.started and self.registry.any_ready()
        doc["models"] = self.registry.status()
        return doc
