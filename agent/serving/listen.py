"""Listening sockets: the Unix socket (mode, group, stale files) and the optional TCP address.

The Unix socket is bound under a temporary name in its directory, given its mode
and group, and only then renamed into place, so there is no moment when it is
reachable with the wrong permissions.
"""

from __future__ import annotations

import contextlib
import errno
import grp
import logging
import os
import socket
import stat
from pathlib import Path

from agent.errors import AgentError

log = logging.getLogger(__name__)


def _clear_stale(path: Path) -> None:
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise AgentError(f"{path} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(str(path))
    except OSError as exc:
        if exc.errno in (errno.ECONNREFUSED, errno.ENOENT):
            log.info("removing stale socket %s left by an earlier run", path)
            path.unlink(missing_ok=True)
            return
        raise AgentError(f"cannot check the existing socket {path}: {exc}") from exc
    finally:
        probe.close()
    raise AgentError(f"another process is already serving on {path}")


def bind_unix(path: Path, mode: int, group: str) -> socket.socket:
    path.parent.mkdir(parents=True, exist_ok=True)
    _clear_stale(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(tmp))
        tmp.chmod(mode)
        if group:
            try:
                gid = grp.getgrnam(group).gr_gid
            except KeyError:
                raise AgentError(f"server.socket_group: no group named {group!r}") from None
            os.chown(tmp, -1, gid)
        sock.listen(1024)
        tmp.replace(path)
    except OSError as exc:
        sock.close()
        tmp.unlink(missing_ok=True)
        raise AgentError(f"cannot listen on {path}: {exc}") from exc
    except BaseException:
        sock.close()
        tmp.unlink(missing_ok=True)
        raise
    sock.setblocking(False)
    return sock


def bind_tcp(address: str) -> socket.socket:
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, int(port)))
        sock.listen(1024)
    except OSError as exc:
        sock.close()
        raise AgentError(f"cannot listen on {address}: {exc}") from exc
    sock.setblocking(False)
    return sock


def remove_socket_file(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISSOCK(path.lstat().st_mode):
            path.unlink()
