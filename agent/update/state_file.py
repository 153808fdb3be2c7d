"""Where the update life cycle's record lives on disk: one JSON file, replaced atomically.

    state = StateFile(data_dir / "update-state.json")
    record = state.load_or_reset()
    record, actions = step(record, event)
    state.save(record)              # before any of the actions runs
    ...

`save` goes through `agent.fsutil.write_atomic` (temp file, fsync, rename, fsync of the
directory): after a power cut the file holds the old record or the new one, never a mix.
`load` of a missing file gives a fresh IDLE record (a new device); anything unreadable raises
StateError. `load_or_reset` instead moves an unreadable file aside as `<name>.corrupt-<ts>` (kept
for a person to look at), logs why, and starts from a fresh record: the agent then serves what it
finds installed and takes the hub's assignment from the start. What is lost is the record of
bad versions, so a version that failed here may be tried once more.

The only module of the life cycle that does I/O.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

from agent.errors import StateError
from agent.fsutil import fsync_dir, write_atomic
from agent.update.lifecycle import UpdateRecord

log = logging.getLogger(__name__)

MAX_STATE_BYTES = 1024 * 1024  # a record is well under 4 KiB; more means it is not ours


class StateFile:
    """The update record's file. Not locked: one agent owns its data directory."""

    def __init__(self, path: Path | str, clock: Callable[[], float] = time.time) -> None:
        self.path = Path(path)
        self._clock = clock

    def load(self) -> UpdateRecord:
        """The saved record; a fresh IDLE record when there is no file. StateError if unreadable."""
        raw = self._read()
        return UpdateRecord() if raw is None else self._parse(raw)

    def load_or_reset(self) -> UpdateRecord:
        """`load`, but a file whose content is unusable is moved aside and a fresh record returned.

        A file that cannot be read at all (permissions, I/O error) still raises StateError: that
        is the machine's problem, not the record's, and resetting would lose a good record.
        """
        raw = self._read()
        if raw is None:
            return UpdateRecord()
        try:
            return self._parse(raw)
        except StateError as exc:
            aside = self._aside_path()
            try:
                self.path.rename(aside)
                fsync_dir(self.path.parent)
            except OSError as move_exc:
                raise StateError(
                    f"{exc}; and it cannot be moved aside ({move_exc.strerror or move_exc})"
                ) from move_exc
            log.warning("update state reset: %s; the old file is kept as %s", exc, aside.name)
            return UpdateRecord()

    def _read(self) -> bytes | None:
        try:
            with self.path.open("rb") as f:
                raw = f.read(MAX_STATE_BYTES + 1)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StateError(f"{self.path}: cannot read the update state ({exc.strerror or exc})") from exc
        return raw

    def _parse(self, raw: bytes) -> UpdateRecord:
        if len(raw) > MAX_STATE_BYTES:
            raise StateError(f"{self.path}: larger than {MAX_STATE_BYTES} bytes; not an update state")
        try:
            doc = json.loads(raw)
        except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
            raise StateError(f"{self.path}: not valid JSON ({exc})") from exc
        try:
            return UpdateRecord.from_json(doc)
        except StateError as exc:
            raise StateError(f"{self.path}: {exc}") from exc

    def save(self, record: UpdateRecord) -> None:
        """Replace the file with `record`, atomically and durably."""
        data = json.dumps(record.to_json(), sort_keys=True, indent=1, ensure_ascii=True) + "\n"
        write_atomic(self.path, data.encode("ascii"))

    def _aside_path(self) -> Path:
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(self._clock()))
        candidate = self.path.with_name(f"{self.path.name}.corrupt-{stamp}")
        n = 1
        while candidate.exists():
            n += 1
            candidate = self.path.with_name(f"{self.path.name}.corrupt-{stamp}-{n}")
        return candidate
