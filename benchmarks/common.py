"""What the throughput benchmarks share: the bare-encoder baseline and peak RSS of a process tree."""

from __future__ import annotations

import os
import threading
import time


def tree_rss(root_pid: int) -> int:
    """Summed RSS (bytes) of `root_pid` and its descendants, read from /proc (no psutil here)."""
    parent: dict[int, int] = {}
    rss: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/status") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
            parent[int(entry)] = int(fields["PPid"])
            rss[int(entry)] = int(fields.get("VmRSS", "0 kB").split()[0]) * 1024
        except (OSError, KeyError, ValueError):
            continue
    keep, frontier = {root_pid}, [root_pid]
    while frontier:
        p = frontier.pop()
        for child, pp in parent.items():
            if pp == p and child not in keep:
                keep.add(child)
                frontier.append(child)
    return sum(rss.get(p, 0) for p in keep)


class PeakRSS:
    """Samples `tree_rss` of this process in a thread while the `with` block runs."""

    def __enter__(self) -> PeakRSS:
        self.peak, self._stop = 0, threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, tree_rss(os.getpid()))
            self._stop.wait(0.5)  # a /proc scan costs CPU the pipeline is measured on: sample sparingly

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()


def bare_throughput(encoder: str, pixels, batch: int, threads: int, layers=False) -> float:
    """Images/s of the encoder alone on in-memory pixels: pooled embeddings, or with `layers` (None
    for the last block, or a list) the dense maps a dense extraction computes."""
    import torch

    from tasks.encoders import create_encoder

    torch.set_num_threads(threads)
    enc = create_encoder(encoder, weights="random")
    x = torch.from_numpy(pixels)

    def forward(b):
        return enc.embed(b, pooling="cls+mean") if layers is False else enc.dense(b, layers=layers)

    forward(x[:batch])  # warm-up: first-call allocations
    t0 = time.perf_counter()
    for s in range(0, len(x), batch):
        forward(x[s:s + batch])
    return len(x) / (time.perf_counter() - t0)


def bare_rate(when: str, encoder: str, pixels, batch: int, threads: int, unit: str, what: str,
              layers=False) -> float:
    """`bare_throughput`, printed. Benchmarks measure it before and after their pipeline runs and
    average the two: on a small shared machine the encoder's speed drifts by ~10% over minutes,
    as much as the effect measured."""
    rate = bare_throughput(encoder, pixels, batch, threads, layers)
    print(f"bare encoder ({when}): {rate:.2f} {unit}/s on {what} ({encoder}, {pixels.shape[-1]}px, "
          f"batch {batch}, {threads} threads)")
    return rate
