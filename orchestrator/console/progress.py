"""The console is medscale's: Ray's and Tune's own output goes to a log file, progress is ours.

`quiet_ray_output(log_path)` sends everything written to the process's stdout and stderr file
descriptors (Ray's Python logging, Tune's boxes and hints, worker output Ray forwards to the driver,
the C++ core worker's log lines) to `log_path`, while medscale's console keeps the original
terminal. It works at the file-descriptor level because Ray's C++ side writes to fd 2 directly.

`Progress` is one bar: tqdm on a terminal; without one (`make demo > log`, CI) a line every few
seconds, never a stream of carriage returns.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

_stream: IO[str] | None = None  # where medscale's console writes while Ray's output is redirected


def stream() -> IO[str]:
    return _stream or sys.stdout


@contextmanager
def quiet_ray_output(log_path: Path, enabled: bool = True) -> Iterator[Path | None]:
    """Redirect fds 1 and 2 to `log_path` (appended) for the block; the console keeps the terminal."""
    global _stream
    if not enabled:
        yield None
        return
    log_path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    log = open(log_path, "a", buffering=1)  # noqa: SIM115 - closed in finally
    try:
        fd_backed = sys.stdout.fileno() == 1 and sys.stderr.fileno() == 2
    except (AttributeError, OSError, ValueError):  # a captured stream (pytest capsys, a notebook)
        fd_backed = False
    prev_stream, prev_out, prev_err = _stream, sys.stdout, sys.stderr
    saved: tuple[int, int] | None = None
    try:
        if fd_backed:
            saved = (os.dup(1), os.dup(2))
            _stream = os.fdopen(os.dup(saved[0]), "w", buffering=1)
            os.dup2(log.fileno(), 1)
            os.dup2(log.fileno(), 2)
        else:
            _stream = prev_out
            sys.stdout = sys.stderr = log
        yield log_path
    finally:
        for s in (sys.stdout, sys.stderr):
            try:
                s.flush()
            except (OSError, ValueError):
                pass
        if saved is not None:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
            if _stream is not None and _stream is not prev_out:
                _stream.close()
        sys.stdout, sys.stderr = prev_out, prev_err
        _stream = prev_stream
        log.close()
        if log_path.stat().st_size == 0:  # nothing started (a config or data error): no empty log
            log_path.unlink()


class Progress:
    """A progress bar (TTY) or a progress line every `interval` seconds (no TTY)."""

    def __init__(self, label: str, total: int | None, unit: str, interval: float = 5.0):
        self.label, self.total, self.unit, self.interval = label, total, unit, interval
        self.n, self.t0, self._last = 0, time.perf_counter(), 0.0
        out = stream()
        self._bar: Any = None
        if out.isatty() and not os.environ.get("TQDM_DISABLE"):
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, desc=f"   {label}", unit=f" {unit}", file=out, leave=False,
                             dynamic_ncols=True)

    def update_to(self, n: int) -> None:
        if n <= self.n:
            return
        if self._bar is not None:
            self._bar.update(n - self.n)
        self.n = n
        now = time.perf_counter()
        if self._bar is None and now - self._last >= self.interval:
            self._last = now
            stream().write(self.line() + "\n")
            stream().flush()

    def line(self) -> str:
        dt = max(time.perf_counter() - self.t0, 1e-9)
        rate = self.n / dt
        if self.total:
            eta = (self.total - self.n) / rate if rate > 0 else float("nan")
            return (f"   {self.label}: {self.n}/{self.total} {self.unit} ({100 * self.n / self.total:.0f}%), "
                    f"{rate:.1f} {self.unit}/s, ETA {eta:.0f} s")
        return f"   {self.label}: {self.n} {self.unit}, {rate:.1f} {self.unit}/s"

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def parquet_rows(fs: Any, infos: list[Any], seen: dict[str, int]) -> int:
    """Rows of the Parquet files among `infos` (each file's footer read once; one still being
    written is read at a later poll)."""
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq

    for info in infos:
        if info.type != pafs.FileType.File or not info.path.endswith(".parquet") or info.path in seen:
            continue
        try:
            with fs.open_input_file(info.path) as f:
                seen[info.path] = pq.ParquetFile(f).metadata.num_rows
        except Exception:  # noqa: BLE001 - still being written: read it at the next poll
            continue
    return sum(seen.values())


def files_with_suffix(suffix: str) -> Callable[[Any, list[Any], dict[str, int]], int]:
    """A counter of the files ending in `suffix` (one per item: e.g. a dense map per case)."""
    return lambda fs, infos, seen: sum(1 for i in infos if i.path.endswith(suffix))


@contextmanager
def watch_output(fs: Any, directory: str, progress: Progress,
                 count: Callable[[Any, list[Any], dict[str, int]], int] = parquet_rows,
                 every: float = 1.0) -> Iterator[None]:
    """Advance `progress` by what appears under `directory` while the block runs (the pipeline's
    output as Ray Data writes it, counted by `count`): progress without any Ray API."""
    import pyarrow.fs as pafs

    seen: dict[str, int] = {}
    stop = threading.Event()

    def poll() -> None:
        try:
            infos = fs.get_file_info(pafs.FileSelector(directory, recursive=True, allow_not_found=True))
        except OSError:
            return
        progress.update_to(count(fs, infos, seen))

    def loop() -> None:
        while not stop.wait(every):
            poll()

    thread = threading.Thread(target=loop, name="medscale-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        progress.close()
