"""Hot reload of a file-backed object (rules, model) without threads.

The services call `maybe_reload()` once per batch or every few seconds. It costs one `stat`
when nothing changed. A changed file is loaded; if that fails (broken content, file deleted) the
object in force stays in force, the error is recorded and `failed_reloads` grows, once per
distinct state of the file (not once per call), so the counter means "bad files seen".

Writers should replace the file atomically (write a temp file, then rename): the reloader also
copes with a half-written file (it fails to parse, is counted, and the completed file is picked
up on the next call because its size or mtime differ), but an atomic rename avoids the noise.
"""

from __future__ import annotations

import enum
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar

from shared.errors import FraudstreamError

__all__ = ["FileSignature", "ReloadResult", "ReloadStatus", "ReloadingFile", "file_signature"]

T = TypeVar("T")

# (inode, mtime_ns, size); None when the file cannot be stat'ed. The inode catches an atomic
# replace that happens to keep the same size and a coarse-grained mtime.
FileSignature = tuple[int, int, int] | None


def file_signature(path: Path) -> FileSignature:
    """What `maybe_reload` compares between calls: cheap, no read."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)


class ReloadStatus(enum.StrEnum):
    UNCHANGED = "unchanged"  # the file is as last seen; nothing done
    RELOADED = "reloaded"  # a new version is in force
    FAILED = "failed"  # the file changed but was rejected; the previous version stays


@dataclass(frozen=True)
class ReloadResult:
    status: ReloadStatus
    version: str  # the version in force after this call
    error: FraudstreamError | None = None  # set when status is FAILED


class ReloadingFile(Generic[T]):
    """Holds the current object loaded from `path` and swaps it when the file changes.

    The first load happens in the constructor and raises: a service must not start without
    usable rules or model. Later failures never raise; they are returned and counted.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        load: Callable[[Path], T],
        version_of: Callable[[T], str],
    ) -> None:
        self.path = Path(path)
        self._load = load
        self._version_of = version_of
        # Stat before reading: if the file changes while we read, the next call sees a newer
        # signature and loads again.
        signature = file_signature(self.path)
        self._current = load(self.path)
        self._signature = signature
        self.reloads = 0
        self.failed_reloads = 0
        self.last_error: FraudstreamError | None = None

    @property
    def current(self) -> T:
        return self._current

    @property
    def version(self) -> str:
        return self._version_of(self._current)

    def maybe_reload(self) -> ReloadResult:
        signature = file_signature(self.path)
        if signature == self._signature:
            return ReloadResult(ReloadStatus.UNCHANGED, self.version)
        # Remember this state whatever the outcome, so a broken file is reported once, not on
        # every call until someone fixes it.
        self._signature = signature
        try:
            loaded = self._load(self.path)
        except FraudstreamError as e:
            self.failed_reloads += 1
            self.last_error = e
            return ReloadResult(ReloadStatus.FAILED, self.version, e)
        self._current = loaded
        self.reloads += 1
        self.last_error = None
        return ReloadResult(ReloadStatus.RELOADED, self.version)
