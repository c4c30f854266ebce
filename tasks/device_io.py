"""Moving batches to and from the encoder's device without stalling it (docs/gpu.md).

On CUDA, pageable host memory makes every copy synchronous: the host waits for the forward pass
queued before it, then for the copy, and the GPU idles while the host prepares the next batch.
`DeviceIO` copies in on one side stream and out on another, through pinned host buffers
(PyTorch's caching host allocator recycles them, so a buffer per batch costs no `cudaHostAlloc`
once warm), and `stream` keeps one batch in flight: the copy out of batch i runs while batch i+1
is computed. On a CPU device every step is a plain synchronous call, so CPU runs take the same code.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch


class DeviceIO:
    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        if self.cuda:
            self._in = torch.cuda.Stream(device)
            self._out = torch.cuda.Stream(device)

    def upload(self, x: torch.Tensor) -> torch.Tensor:
        """A host batch on the device; on CUDA copied from pinned memory on the input stream, which
        the compute stream then waits for (so the copy overlaps whatever the GPU is computing)."""
        if not self.cuda or x.device == self.device:  # already there (resized on the device)
            return x.to(self.device)
        src = x if x.is_pinned() else x.pin_memory()
        compute = torch.cuda.current_stream(self.device)
        with torch.cuda.stream(self._in):
            xd = src.to(self.device, non_blocking=True)
        compute.wait_stream(self._in)
        xd.record_stream(compute)  # allocated on the input stream, used on the compute stream
        return xd

    def download(self, y: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """Start copying a device tensor into a pinned host buffer; returns (buffer, event). The
        buffer is valid once `finish` has waited for the event."""
        if not self.cuda:
            return y.detach().to("cpu"), None
        host = torch.empty(y.shape, dtype=y.dtype, pin_memory=True)
        self._out.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self._out):
            host.copy_(y, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self._out)
        y.record_stream(self._out)  # keep the allocator from reusing y's memory before the copy ends
        return host, done

    @staticmethod
    def finish(pending: tuple[torch.Tensor, Any]) -> torch.Tensor:
        host, done = pending
        if done is not None:
            done.synchronize()
        return host


def stream(io: DeviceIO, batches: Iterable[torch.Tensor], forward: Callable[[torch.Tensor], torch.Tensor]
           ) -> Iterator[torch.Tensor]:
    """forward(upload(b)) for each host batch, copied back to the host; yields batch i's result
    only after batch i+1's forward is queued, so the GPU never waits on the host between them."""
    pending = None
    for b in batches:
        nxt = io.download(forward(io.upload(b)))
        if pending is not None:
            yield io.finish(pending)
        pending = nxt
    if pending is not None:
        yield io.finish(pending)
