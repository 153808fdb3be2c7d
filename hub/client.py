"""The operator's HTTP client for the hub's API (used by `outpost push/deploy/...`).

Every failure becomes a `HubRequestError` with one line a person can act on: the
hub's own message for a 4xx, what to check for a network problem.
"""

from __future__ import annotations

import io
import json
import os
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

from hub.errors import HubError

DEFAULT_HUB = "http://127.0.0.1:8700"
CONNECT_TIMEOUT_S = 5.0
READ_TIMEOUT_S = 300.0  # a push waits while the hub validates and signs
CHUNK = 256 * 1024
# A 429 (the hub's rate limits, hub.api.guard) is waited out as its Retry-After says, this many
# times, when the wait is at most this long; past that the caller gets the refusal.
RATE_LIMIT_RETRIES = 3
RATE_LIMIT_MAX_WAIT_S = 30.0


class HubRequestError(HubError):
    """The hub refused a request or could not be reached."""


@dataclass(frozen=True)
class HubTarget:
    url: str
    token: str

    @classmethod
    def resolve(cls, url: str | None, token: str | None) -> HubTarget:
        url = url or os.environ.get("OUTPOST_HUB") or DEFAULT_HUB
        token = token or os.environ.get("OUTPOST_TOKEN") or ""
        if not token:
            raise HubRequestError(
                "no operator token: pass --token or set OUTPOST_TOKEN "
                "(outpost-hub init printed one and wrote it to DATA/operator.token)"
            )
        return cls(url.rstrip("/"), token)


def package_tar(path: Path) -> bytes:
    """A package as tar bytes: a .tar file as it is, a directory packed (manifest + model)."""
    if path.is_file():
        return path.read_bytes()
    if not path.is_dir():
        raise HubRequestError(f"{path}: no such package directory or .tar file")
    from agent.errors import PackageError
    from agent.package.store import write_package_tar

    try:
        with tempfile.TemporaryDirectory() as work:
            archive = Path(work) / "package.tar"
            write_package_tar(path, archive)
            return archive.read_bytes()
    except PackageError as exc:
        raise HubRequestError(str(exc)) from exc


def _progress(total: int, label: str) -> Callable[[int], None]:
    shown = [-1]
    tty = sys.stderr.isatty()

    def update(done: int) -> None:
        pct = 100 if total == 0 else done * 100 // total
        if pct == shown[0] or (not tty and pct not in (0, 100)):
            return
        shown[0] = pct
        bar = "#" * (pct // 4)
        end = "\n" if pct == 100 else ""
        sys.stderr.write(f"\r{label} [{bar:<25}] {pct:3d}% of {total / 1e6:.1f} MB{end}")
        sys.stderr.flush()

    return update


class _Upload:
    """A body requests streams in chunks, reporting progress as it goes."""

    def __init__(self, data: bytes, on_progress: Callable[[int], None]) -> None:
        self._data = data
        self._on_progress = on_progress

    def __len__(self) -> int:
        return len(self._data)

    def __iter__(self) -> Iterator[bytes]:
        for start in range(0, len(self._data), CHUNK):
            chunk = self._data[start : start + CHUNK]
            yield chunk
            self._on_progress(start + len(chunk))
        if not self._data:
            self._on_progress(0)


class HubClient:
    def __init__(self, target: HubTarget, session: requests.Session | None = None) -> None:
        self.target = target
        self.session = session or requests.Session()

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        headers = kwargs.pop("headers", {})
        headers["Authorization"] = f"Bearer {self.target.token}"
        url = self.target.url + path
        try:
            for attempt in range(RATE_LIMIT_RETRIES + 1):
                resp = self.session.request(
                    method, url, headers=headers, timeout=(CONNECT_TIMEOUT_S, READ_TIMEOUT_S), **kwargs
                )
                wait = _retry_after(resp)
                if wait is None or wait > RATE_LIMIT_MAX_WAIT_S or attempt == RATE_LIMIT_RETRIES:
                    break
                time.sleep(wait)
        except requests.ConnectionError:
            raise HubRequestError(
                f"cannot reach the hub at {self.target.url}; is outpost-hub serving?"
            ) from None
        except requests.Timeout:
            raise HubRequestError(f"the hub at {self.target.url} did not answer in time") from None
        except requests.RequestException as exc:
            raise HubRequestError(f"request to {url} failed: {exc}") from exc
        if resp.status_code >= 400:
            try:
                detail = resp.json().get("detail") or resp.json().get("error")
            except ValueError:
                detail = resp.text.strip()[:300]
            if isinstance(detail, list):  # FastAPI validation errors
                detail = "; ".join(str(d.get("msg", d)) for d in detail)
            raise HubRequestError(f"hub refused ({resp.status_code}): {detail}")
        if resp.status_code == 204 or not resp.content:
            return None
        return resp.json()

    def push(self, package: Path, progress: bool = True) -> dict[str, Any]:
        data = package_tar(package)
        from agent.package.manifest import parse_manifest

        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            member = next((m for m in tar.getmembers() if Path(m.name).name == "manifest.json"), None)
            raw = tar.extractfile(member) if member is not None else None
            if raw is None:
                raise HubRequestError(f"{package}: the package has no manifest.json")
            manifest = parse_manifest(json.loads(raw.read()))
        report = _progress(len(data), f"uploading {manifest.name} v{manifest.version}") if progress else None
        body: Any = _Upload(data, report) if report is not None else data
        result: dict[str, Any] = self._call(
            "POST",
            f"/api/v1/models/{manifest.name}/versions",
            data=body,
            headers={"Content-Type": "application/x-tar"},
        )
        return result

    def deploy(
        self,
        group: str,
        model: str,
        version: int,
        candidate: int | None = None,
        percent: int = 0,
        experiment: dict[str, Any] | None = None,
        salt: str | None = None,
    ) -> dict[str, Any]:
        doc: dict[str, Any] = {"model": model, "stable": version, "candidate": candidate, "percent": percent}
        if experiment is not None:
            doc["experiment"] = experiment
        if salt is not None:
            doc["salt"] = salt
        result: dict[str, Any] = self._call("PUT", f"/api/v1/groups/{group}/deployment", json=doc)
        return result

    def experiments(
        self, model: str | None = None, group: str | None = None, live: bool | None = None
    ) -> list[dict[str, Any]]:
        params = _params(model=model, group=group, live=None if live is None else str(live).lower())
        result: list[dict[str, Any]] = self._call("GET", "/api/v1/experiments", params=params)
        return result

    def stop_experiment(self, group: str) -> dict[str, Any]:
        result: dict[str, Any] = self._call("DELETE", f"/api/v1/groups/{group}/experiment")
        return result

    def rollback(self, group: str, model: str) -> dict[str, Any]:
        result: dict[str, Any] = self._call("POST", f"/api/v1/groups/{group}/rollback", json={"model": model})
        return result

    def models(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self._call("GET", "/api/v1/models")
        return result

    def groups(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self._call("GET", "/api/v1/groups")
        return result

    def fleet(self, group: str | None = None) -> list[dict[str, Any]]:
        params = {"group": group} if group else None
        result: list[dict[str, Any]] = self._call("GET", "/api/v1/fleet", params=params)
        return result

    def device(self, device_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self._call("GET", f"/api/v1/fleet/{device_id}")
        return result

    def fleet_summary(
        self, model: str, version: int | None = None, since: str | None = None, group: str | None = None
    ) -> dict[str, Any]:
        params = _params(model=model, version=version, since=since, group=group)
        result: dict[str, Any] = self._call("GET", "/api/v1/fleet/summary", params=params)
        return result

    def fleet_drift(
        self, model: str, version: int | None = None, since: str | None = None, group: str | None = None
    ) -> dict[str, Any]:
        params = _params(model=model, version=version, since=since, group=group)
        result: dict[str, Any] = self._call("GET", "/api/v1/fleet/drift", params=params)
        return result

    def fleet_alerts(
        self, since: str | None = None, kind: str | None = None, model: str | None = None
    ) -> list[dict[str, Any]]:
        params = _params(since=since, kind=kind, model=model)
        result: list[dict[str, Any]] = self._call("GET", "/api/v1/fleet/alerts", params=params)
        return result

    def start_rollout(self, doc: dict[str, Any]) -> dict[str, Any]:
        result: dict[str, Any] = self._call("POST", "/api/v1/rollouts", json=doc)
        return result

    def rollouts(self, model: str | None = None, group: str | None = None) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self._call(
            "GET", "/api/v1/rollouts", params=_params(model=model, group=group)
        )
        return result

    def rollout(self, rollout_id: int) -> dict[str, Any]:
        result: dict[str, Any] = self._call("GET", f"/api/v1/rollouts/{rollout_id}")
        return result

    def rollout_action(self, rollout_id: int, action: str, reason: str = "") -> dict[str, Any]:
        path = f"/api/v1/rollouts/{rollout_id}/{action}"
        result: dict[str, Any] = self._call("POST", path, json={"reason": reason})
        return result


    def alert_webhooks(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self._call("GET", "/api/v1/alerting/webhooks")
        return result

    def alert_deliveries(
        self, webhook: str | None = None, state: str | None = None, limit: int = 50
    ) -> list[dict[str, Any]]:
        params = _params(webhook=webhook, state=state, limit=limit)
        result: list[dict[str, Any]] = self._call("GET", "/api/v1/alerting/deliveries", params=params)
        return result

    def alert_test(self, webhook: str) -> dict[str, Any]:
        result: dict[str, Any] = self._call("POST", "/api/v1/alerting/test", json={"webhook": webhook})
        return result


    # -- data capture (hub.capture) ---------------------------------------------------------------

    def set_capture(self, group: str, sample_bp: int, max_rows_per_min: int | None = None) -> dict[str, Any]:
        doc = _params(sample_bp=sample_bp, max_rows_per_min=max_rows_per_min)
        result: dict[str, Any] = self._call("PUT", f"/api/v1/groups/{group}/capture", json=doc)
        return result

    def stop_capture(self, group: str) -> dict[str, Any]:
        result: dict[str, Any] = self._call("DELETE", f"/api/v1/groups/{group}/capture")
        return result

    def capture(self, model: str | None = None) -> dict[str, Any]:
        result: dict[str, Any] = self._call("GET", "/api/v1/capture", params=_params(model=model))
        return result

    def download(self, path: str, params: dict[str, Any], sink: Callable[[bytes], Any]) -> int:
        """A streamed GET: each chunk of the body to `sink`; the number of bytes."""
        headers = {"Authorization": f"Bearer {self.target.token}"}
        try:
            with self.session.get(
                self.target.url + path,
                params=params,
                headers=headers,
                stream=True,
                timeout=(CONNECT_TIMEOUT_S, READ_TIMEOUT_S),
            ) as resp:
                if resp.status_code >= 400:
                    try:
                        detail = resp.json().get("detail")
                    except ValueError:
                        detail = resp.text.strip()[:300]
                    raise HubRequestError(f"hub refused ({resp.status_code}): {detail}")
                size = 0
                for chunk in resp.iter_content(CHUNK):
                    sink(chunk)
                    size += len(chunk)
                return size
        except requests.ConnectionError:
            raise HubRequestError(
                f"cannot reach the hub at {self.target.url}; is outpost-hub serving?"
            ) from None
        except requests.RequestException as exc:
            raise HubRequestError(f"download from {self.target.url}{path} failed: {exc}") from exc


def _retry_after(resp: requests.Response) -> float | None:
    """The seconds a 429 asks to wait (Retry-After in seconds); None for other answers."""
    if resp.status_code != 429:
        return None
    try:
        return max(0.0, float(resp.headers.get("Retry-After", "1")))
    except ValueError:
        return None  # an HTTP date: not what the hub sends; give up


def _params(**values: Any) -> dict[str, Any]:
    return {k: v for k, v in values.items() if v is not None}
