"""Scratch directories of the feature cache, each held by a lease, and the clean-up of dead ones.

An extraction writes its Parquet parts under `<cache>/tmp/<name>/` before publishing them as a
cache entry. A writer that is killed (driver SIGKILLed, node lost) leaves that directory behind.
Every scratch directory gets a lease file beside it, `<cache>/tmp/<name>.lease.json`, naming the
host and process that holds it, refreshed by a heartbeat thread while the writer lives. When the
cache is opened for a sweep, a directory is removed only if its writer is certainly gone:
- its lease names this host and a process that no longer exists (checked where the OS can tell), or
- its lease has not been refreshed for `stale_after_s` (any host: shared storage, clock skew
  tolerated by the margin), or
- it has no lease (an older release's, or a directory moved aside as garbage) and is older than
  `stale_after_s`; `stale-*` directories (moved aside by `FeatureCache.commit`) go at once.
A live writer on another node refreshes its lease every `HEARTBEAT_S`, so it is never swept away.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
import uuid

import pyarrow.fs as pafs

from orchestrator.store import storage

LEASE_SUFFIX = ".lease.json"
HEARTBEAT_S = 60.0
STALE_AFTER_S = 30 * 60.0  # 30 heartbeats missed


def _pid_alive(pid: int) -> bool | None:
    """Whether a process of this host exists; None where the OS gives no safe answer."""
    if sys.platform == "win32":
        return None  # os.kill(pid, 0) would terminate the process on Windows
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except OSError:
        return None
    return True


class Leases:
    """The scratch directories one process holds under `tmp`, kept alive by one heartbeat thread."""

    def __init__(self, fs: pafs.FileSystem, tmp: str):
        self.fs, self.tmp = fs, tmp
        self.held: set[str] = set()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def _write(self, path: str) -> None:
        lease = {"host": socket.gethostname(), "pid": os.getpid(), "heartbeat": time.time()}
        storage.write_bytes(self.fs, f"{path}{LEASE_SUFFIX}", json.dumps(lease).encode())

    def acquire(self) -> str:
        """A new scratch directory, leased (lease first: a directory never exists unleased)."""
        path = f"{self.tmp}/{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}"
        self._write(path)
        self.fs.create_dir(path, recursive=True)
        with self._lock:
            self.held.add(path)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._beat, name="medscale-scratch-lease", daemon=True)
                self._thread.start()
        return path

    def release(self, path: str) -> None:
        """Drop the directory (if still there) and its lease."""
        with self._lock:
            self.held.discard(path)
        if storage.exists(self.fs, path):
            self.fs.delete_dir(path)
        if storage.exists(self.fs, f"{path}{LEASE_SUFFIX}"):
            self.fs.delete_file(f"{path}{LEASE_SUFFIX}")

    def _beat(self) -> None:
        while True:
            time.sleep(HEARTBEAT_S)
            with self._lock:
                held = list(self.held)
            if not held:
                continue
            for path in held:
                try:
                    self._write(path)
                except OSError:  # storage hiccup: the next beat tries again
                    pass


def stale_scratch(fs: pafs.FileSystem, tmp: str, stale_after_s: float = STALE_AFTER_S,
                  now: float | None = None) -> list[str]:
    """Scratch directories under `tmp` whose writer is gone (module docstring)."""
    now = time.time() if now is None else now
    host = socket.gethostname()
    entries = fs.get_file_info(pafs.FileSelector(tmp, allow_not_found=True))
    dirs = {e.path: e for e in entries if e.type == pafs.FileType.Directory}
    leases = {e.path[: -len(LEASE_SUFFIX)]: e for e in entries
              if e.type == pafs.FileType.File and e.path.endswith(LEASE_SUFFIX)}
    stale = []
    for path in sorted(set(dirs) | set(leases)):
        name = path.rsplit("/", 1)[-1]
        lease = storage.read_json(fs, f"{path}{LEASE_SUFFIX}") if path in leases else None
        if lease is None:
            info = dirs.get(path)
            age = now - info.mtime.timestamp() if info is not None and info.mtime is not None else float("inf")
            if name.startswith("stale-") or age >= stale_after_s:
                stale.append(path)
            continue
        if now - float(lease.get("heartbeat", 0)) >= stale_after_s:
            stale.append(path)
        elif lease.get("host") == host and _pid_alive(int(lease.get("pid", -1))) is False:
            stale.append(path)
    return stale


def clean_stale(fs: pafs.FileSystem, tmp: str, stale_after_s: float = STALE_AFTER_S) -> list[str]:
    """Remove the scratch directories (and leases) of dead writers; returns what was removed."""
    removed = []
    for path in stale_scratch(fs, tmp, stale_after_s):
        try:
            if storage.exists(fs, path):
                fs.delete_dir(path)
            if storage.exists(fs, f"{path}{LEASE_SUFFIX}"):
                fs.delete_file(f"{path}{LEASE_SUFFIX}")
            removed.append(path)
        except OSError:  # another cleaner got there first
            continue
    return removed
