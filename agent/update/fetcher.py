"""The HTTP side of the TUF client: python-tuf's `FetcherInterface` on one `requests.Session`.

    fetcher = HubFetcher(config.hub, temp_dir=data_dir / "tuf" / "targets")
    Updater(..., fetcher=fetcher)

- Timeouts: `hub.connect_timeout_s` to connect, `hub.read_timeout_s` of silence while reading.
- Size: python-tuf passes the most it will accept (the signed length of a target, a cap for
  metadata). A `Content-Length` above it is refused before the body is read, and the body is
  read in pieces of at most what is still allowed plus one byte, so an endless response costs
  at most `max_length + 1` bytes (DownloadLengthMismatchError), never memory or disk beyond.
- Retries: connection errors, timeouts before the response, 429 and 5xx are retried up to
  `hub.max_attempts` tries in all; after the n-th failed try it waits a random time in
  [0, min(retry_max_s, retry_base_s * 2**(n-1))] ("full jitter"). A response whose body fails
  half-way is not retried: the next update cycle starts over.
- HTTP errors raise `DownloadHTTPError(msg, status)` (404/403 end python-tuf's probe for a
  newer root); every other failure is a `DownloadError` (timeouts: `SlowRetrievalError`).
- Proxy and TLS from config: `hub.proxy`, `hub.ca_bundle`, `hub.tls_verify`, `hub.client_cert`,
  `hub.client_key`.

Conditional polls: `timestamp.json`, the one file every poll fetches, is asked for with the ETag
of the copy fetched last (If-None-Match); a 304 hands python-tuf that copy again, which it verifies
as always (signature, version, expiry). A poll that finds nothing new then costs the hub a header
check instead of a file read and the device no body.

Downloads spool to an anonymous temporary file in `temp_dir` (python-tuf verifies it before
the caller copies it anywhere): a model never passes through memory, nor through a RAM-backed
/tmp on a small device.
"""

from __future__ import annotations

import logging
import random
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

import requests
import urllib3
from tuf.api import exceptions
from tuf.ngclient.fetcher import FetcherInterface

from agent import __version__
from agent.config import HubConfig

log = logging.getLogger(__name__)

CHUNK_BYTES = 256 * 1024
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
USER_AGENT = f"outpost-agent/{__version__}"
CONDITIONAL_SUFFIX = "/timestamp.json"  # polled every cycle: fetched with If-None-Match


class HubFetcher(FetcherInterface):
    """Fetches TUF metadata and targets over HTTP(S) with the limits of `config`."""

    def __init__(
        self,
        config: HubConfig,
        temp_dir: Path | None = None,
        *,
        sleep: Callable[[float], None] = time.sleep,
        rng: random.Random | None = None,
    ) -> None:
        self._config = config
        self._temp_dir = temp_dir
        self._sleep = sleep
        self._rng = rng if rng is not None else random.Random()
        self._timeout = (config.connect_timeout_s, config.read_timeout_s)
        self._session = _session(config)
        # Passed with every request too: requests lets REQUESTS_CA_BUNDLE / CURL_CA_BUNDLE in the
        # environment override a session's `verify`, but never a request's.
        self._verify: bool | str = config.ca_bundle if config.ca_bundle else config.tls_verify
        self._validators: dict[str, tuple[str, bytes]] = {}  # url -> (ETag, body) of polled files
        self.not_modified = 0  # 304 answers to conditional polls

    def close(self) -> None:
        self._session.close()

    # -- FetcherInterface ---------------------------------------------------------------

    def _fetch(self, url: str) -> Iterator[bytes]:
        """The body of `url`, capped at `hub.max_target_bytes` (callers with a length use
        `download_file`, which passes its own limit down)."""
        if url.endswith(CONDITIONAL_SUFFIX):
            return iter((self._conditional(url, self._config.max_target_bytes),))
        return self._chunks(self._get(url), url, self._config.max_target_bytes)

    def _conditional(self, url: str, max_length: int) -> bytes:
        cached = self._validators.get(url)
        response = self._get(url, {"If-None-Match": cached[0]} if cached is not None else None)
        if response.status_code == 304:
            response.close()
            if cached is None:
                raise exceptions.DownloadHTTPError(f"{url}: HTTP 304 to a request without a validator", 304)
            if len(cached[1]) > max_length:
                raise exceptions.DownloadLengthMismatchError(f"{url}: more than {max_length} bytes")
            self.not_modified += 1
            return cached[1]
        body = b"".join(self._chunks(response, url, max_length))
        etag = response.headers.get("ETag")
        if etag:
            self._validators[url] = (etag, body)
        else:
            self._validators.pop(url, None)
        return body

    @contextmanager
    def download_file(self, url: str, max_length: int) -> Iterator[IO[bytes]]:
        """The body of `url` in a temporary file, rewound; never more than `max_length` bytes read."""
        log.debug("downloading %s (at most %d bytes)", url, max_length)
        with tempfile.TemporaryFile(dir=self._temp_dir) as temp:
            try:
                if url.endswith(CONDITIONAL_SUFFIX):
                    temp.write(self._conditional(url, max_length))
                else:
                    response = self._get(url)
                    for chunk in self._chunks(response, url, max_length):
                        temp.write(chunk)
            except exceptions.DownloadError:
                raise
            except Exception as exc:  # anything else, as python-tuf's own fetch() does
                raise exceptions.DownloadError(f"failed to download {url}: {exc}") from exc
            temp.seek(0)
            yield temp

    # -- the work -------------------------------------------------------------------------

    def _get(self, url: str, headers: dict[str, str] | None = None) -> requests.Response:
        """A response with a good status and the body not yet read; retried as described above."""
        attempts = self._config.max_attempts
        for attempt in range(1, attempts + 1):
            last = attempt == attempts
            try:
                response = self._session.get(
                    url, headers=headers, stream=True, timeout=self._timeout, verify=self._verify
                )
            except requests.exceptions.Timeout as exc:
                if last:
                    raise exceptions.SlowRetrievalError(f"{url}: timed out ({exc})") from exc
                reason = f"timed out: {exc}"
            except requests.exceptions.SSLError as exc:  # retrying cannot fix a certificate
                raise exceptions.DownloadError(f"{url}: TLS failed ({exc})") from exc
            except requests.exceptions.ConnectionError as exc:
                if last:
                    raise exceptions.DownloadError(f"{url}: cannot connect ({exc})") from exc
                reason = f"connection error: {exc}"
            except requests.exceptions.RequestException as exc:  # bad URL, TLS file errors, ...
                raise exceptions.DownloadError(f"{url}: {exc}") from exc
            else:
                status = response.status_code
                if status < 400:
                    return response
                response.close()
                if last or status not in RETRY_STATUSES:
                    raise exceptions.DownloadHTTPError(f"{url}: HTTP {status} {response.reason}", status)
                reason = f"HTTP {status}"
            delay = self._rng.uniform(
                0, min(self._config.retry_max_s, self._config.retry_base_s * 2 ** (attempt - 1))
            )
            log.info("%s: %s; try %d of %d in %.2f s", url, reason, attempt + 1, attempts, delay)
            self._sleep(delay)
        raise AssertionError("unreachable: the last attempt returns or raises")  # pragma: no cover

    @staticmethod
    def _chunks(response: requests.Response, url: str, max_length: int) -> Iterator[bytes]:
        """The body in pieces; DownloadLengthMismatchError as soon as it is over `max_length`."""
        try:
            declared = response.headers.get("Content-Length")
            if declared is not None and declared.isdigit() and int(declared) > max_length:
                raise exceptions.DownloadLengthMismatchError(
                    f"{url}: the server announces {declared} bytes, more than the {max_length} allowed"
                )
            raw = response.raw
            received = 0
            while True:
                # At most one byte more than allowed, so "too long" is seen without reading on.
                chunk: bytes = raw.read(min(CHUNK_BYTES, max_length - received + 1), decode_content=True)
                if not chunk:
                    return
                received += len(chunk)
                if received > max_length:
                    raise exceptions.DownloadLengthMismatchError(
                        f"{url}: the response is longer than the {max_length} bytes allowed"
                    )
                yield chunk
        except exceptions.DownloadError:
            raise
        except (urllib3.exceptions.TimeoutError, requests.exceptions.Timeout) as exc:
            raise exceptions.SlowRetrievalError(f"{url}: timed out while reading ({exc})") from exc
        except (urllib3.exceptions.HTTPError, requests.exceptions.RequestException, OSError) as exc:
            raise exceptions.DownloadError(f"{url}: the download broke off ({exc})") from exc
        finally:
            response.close()


def _session(config: HubConfig) -> requests.Session:
    session = requests.Session()
    session.headers["User-Agent"] = USER_AGENT
    # The limits count the bytes as sent: no transparent decompression (no gzip bombs).
    session.headers["Accept-Encoding"] = "identity"
    if config.proxy:
        session.proxies = {"http": config.proxy, "https": config.proxy}
    session.verify = config.ca_bundle if config.ca_bundle else config.tls_verify
    if config.client_cert:
        session.cert = (config.client_cert, config.client_key) if config.client_key else config.client_cert
    return session
