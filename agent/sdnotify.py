"""The systemd notify protocol (sd_notify), with no dependency.

The agent runs as a `Type=notify` service with `WatchdogSec=`: it tells
systemd when it is ready to serve, what it is doing (`systemctl status`
shows the STATUS line), when it starts shutting down, and it pings the
watchdog so that a hung agent is killed and restarted.

The protocol is one datagram per message, sent to the AF_UNIX socket named in
`$NOTIFY_SOCKET`, holding newline-separated `KEY=VALUE` assignments. The
address is either a filesystem path or, when it starts with "@", a name in the
abstract namespace. We speak it ourselves rather than depend on python-systemd
(a C extension built against libsystemd, absent from most device images).

Invariants:
- Without `$NOTIFY_SOCKET` (run by hand, under a test, in a container) every
  method is a cheap no-op, so callers never check whether systemd is there.
- No method raises into its caller: notification is advisory, and a failure
  to tell systemd something must never take the inference service down. The
  first failure is logged as a warning, later ones at debug level only, so a
  missing socket does not flood the journal at every watchdog ping.
- `watchdog_interval()` is the full `WatchdogSec=` budget; callers ping at
  half of it (as sd_watchdog_enabled(3) recommends), leaving room for a late
  wake-up.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Mapping

log = logging.getLogger(__name__)

# Longer than any sane delay of PID 1 reading its queue, short enough that a
# wedged manager cannot stall the caller's event loop for long.
SEND_TIMEOUT_S = 1.0

# sockaddr_un.sun_path is 108 bytes on Linux, including the terminating NUL
# for paths (abstract names use all 108).
_SUN_PATH_MAX = 108


def _parse_address(value: str) -> str | bytes | None:
    """The socket address to send to, or None when the value is unusable.

    Python takes a str path for filesystem sockets and a bytes name starting
    with NUL for the abstract namespace.
    """
    if value.startswith("@"):
        name = b"\0" + value[1:].encode()
        return name if len(name) <= _SUN_PATH_MAX else None
    if value.startswith("/"):
        return value if len(value.encode()) < _SUN_PATH_MAX else None
    # Other schemes (systemd 254+ accepts "vsock:CID:PORT") are for VMs, not
    # for a device agent; treat them like an absent socket.
    return None


def _parse_watchdog(environ: Mapping[str, str], pid: int) -> float | None:
    usec = _parse_uint(environ.get("WATCHDOG_USEC"))
    if not usec:
        return None
    # systemd sets WATCHDOG_PID so that a child which inherits the environment
    # does not believe the watchdog is its job; without it, the value is ours.
    if "WATCHDOG_PID" in environ and _parse_uint(environ["WATCHDOG_PID"]) != pid:
        return None
    return usec / 1_000_000


def _parse_uint(value: str | None) -> int | None:
    # isdigit() alone accepts "²" and other digits int() refuses.
    if value is None or not (value.isascii() and value.isdigit()):
        return None
    return int(value)


class Notifier:
    """Sends sd_notify messages to the service manager, if there is one.

    Build it with `Notifier.from_environment()`; `Notifier(None)` is the
    disabled notifier. Safe to call from several threads. It keeps one socket
    open between messages (the watchdog pings for as long as the agent runs);
    `close()` it, or use it as a context manager.
    """

    def __init__(
        self,
        address: str | None,
        watchdog_interval_s: float | None = None,
        *,
        send_timeout_s: float = SEND_TIMEOUT_S,
    ) -> None:
        self._address = _parse_address(address) if address else None
        if address and self._address is None:
            log.warning("NOTIFY_SOCKET=%r is not a supported address; not notifying", address)
        self._watchdog_interval_s = watchdog_interval_s
        self._send_timeout_s = send_timeout_s
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        self._warned = False

    @classmethod
    def from_environment(
        cls, environ: Mapping[str, str] | None = None, *, pid: int | None = None
    ) -> Notifier:
        """The notifier systemd asked for through `NOTIFY_SOCKET` and `WATCHDOG_*`."""
        env = os.environ if environ is None else environ
        pid = os.getpid() if pid is None else pid
        return cls(env.get("NOTIFY_SOCKET") or None, _parse_watchdog(env, pid))

    @property
    def enabled(self) -> bool:
        """True when messages go to a service manager."""
        return self._address is not None

    def watchdog_interval(self) -> float | None:
        """Seconds systemd waits for a ping before it kills us, or None if no watchdog.

        Ping at half this interval. None too when notifying is off, since
        pings could go nowhere.
        """
        return self._watchdog_interval_s if self.enabled else None

    def ready(self, status: str | None = None) -> None:
        """The service is up: systemd ends `start` and starts dependent units."""
        self.notify("READY=1", *self._status_line(status))

    def status(self, text: str) -> None:
        """A one-line, human-readable state shown by `systemctl status`."""
        self.notify(*self._status_line(text))

    def stopping(self, status: str | None = None) -> None:
        """Shutdown began: `systemctl status` shows it instead of a hung service."""
        self.notify("STOPPING=1", *self._status_line(status))

    def reloading(self, status: str | None = None) -> None:
        """A configuration reload began; send `ready()` when it is done.

        MONOTONIC_USEC lets `Type=notify-reload` (systemd 253+) tell this
        reload apart from an older one; older managers ignore it.
        """
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.notify("RELOADING=1", f"MONOTONIC_USEC={usec}", *self._status_line(status))

    def watchdog(self) -> None:
        """Tells systemd we are alive; resets the `WatchdogSec=` timer."""
        self.notify("WATCHDOG=1")

    def extend_timeout(self, seconds: float) -> None:
        """Asks for `seconds` more before start-up or shutdown is declared hung.

        For a slow, legitimate step such as loading a large model at start.
        """
        self.notify(f"EXTEND_TIMEOUT_USEC={max(0, int(seconds * 1_000_000))}")

    def notify(self, *assignments: str) -> None:
        """Sends `KEY=VALUE` assignments in one datagram. Never raises."""
        if self._address is None or not assignments:
            return
        message = "\n".join(assignments).encode("utf-8", "replace")
        try:
            with self._lock:
                if self._sock is None:
                    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                    sock.settimeout(self._send_timeout_s)
                    self._sock = sock
                # The kernel attaches our credentials; systemd checks the pid
                # against NotifyAccess=main.
                self._sock.sendto(message, self._address)
        except OSError as exc:
            self._report_failure(exc)

    def close(self) -> None:
        """Releases the socket. Later calls reopen it."""
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None

    def __enter__(self) -> Notifier:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _report_failure(self, exc: OSError) -> None:
        if self._warned:
            log.debug("sd_notify failed again: %s", exc)
            return
        self._warned = True
        log.warning(
            "sd_notify to %r failed (%s); further failures are logged at debug level",
            self._address,
            exc,
        )

    @staticmethod
    def _status_line(text: str | None) -> tuple[str, ...]:
        # A newline would start a new assignment: a status text must not be
        # able to send READY=1 or anything else by accident.
        if text is None:
            return ()
        return ("STATUS=" + " ".join(text.splitlines()),)
