"""An append-only file held by one process at a time: the storage under every append-only record store.

`AppendOnlyFile(path)` opens (creating) the file with O_APPEND and takes an exclusive, non-blocking `flock`
on it: a second process opening the same file gets `FileLockedError` at once instead of interleaving its
records (the lock dies with the process, so `kill -9` leaves none behind). `append` writes complete lines
with as many `write` calls as the OS needs, then `fsync`s, so after a crash the file holds whole records plus
at most one torn last line, which the store truncates with `truncate_to` before appending. Torch-free.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from shared_kernels.errors import UserError

__all__ = ["AppendOnlyFile", "FileLockedError"]


class FileLockedError(UserError, RuntimeError):
    """Another running process holds the store."""


class AppendOnlyFile:
    """An exclusively locked, append-only file (context manager).

    Args:
        path: the file; created with its parent folders when missing.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._fd)
            self._fd = -1
            raise FileLockedError(
                f"{self.path} is locked by another running process; wait for it or stop it"
            ) from None

    def read_bytes(self) -> bytes:
        """The whole file as it is now (read under the lock, so no other store is appending)."""
        with open(self.path, "rb") as f:
            return f.read()

    def truncate_to(self, size: int) -> None:
        """Cut a torn tail off (a crash mid-write), durably."""
        os.ftruncate(self._fd, size)
        os.fsync(self._fd)

    def append(self, payload: bytes) -> None:
        """Append `payload` (complete lines) and fsync it."""
        if self._fd < 0:
            raise ValueError(f"{self.path} is closed")
        written = 0
        while written < len(payload):  # os.write may write less than asked
            written += os.write(self._fd, payload[written:])
        os.fsync(self._fd)

    def close(self) -> None:
        if self._fd >= 0:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> AppendOnlyFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
