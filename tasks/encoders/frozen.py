"""A frozen backbone: uint8 pixels in, pooled embeddings or dense patch-feature grids out.

Input is always a uint8 batch (B, 3, H, W): the cache and the decode workers stay compact, and the
normalisation that belongs to the weights (the spec's `Preprocessing`: mean/std, and for a CT model
the HU range the uint8 values stand for) happens here, once. Every family goes through the same
methods: the spec's `ops` say how its library's model gives tokens, its own pooled embedding and
intermediate maps, so protocols and dense heads never see which library built the encoder.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from tasks.device_io import DeviceIO, stream
from tasks.errors import ConfigError

if TYPE_CHECKING:
    from tasks.encoders.spec import EncoderSpec
    from tasks.weights import WeightsInfo

POOLINGS = ("head", "cls", "mean", "cls+mean")


class FrozenEncoder:
    def __init__(self, spec: EncoderSpec, model: torch.nn.Module, weights: WeightsInfo, device: torch.device):
        self.spec, self.weights, self.device = spec, weights, device
        model.eval().requires_grad_(False)
        self.model = model if device.type == "meta" else model.to(device)
        pp = spec.preprocess
        self.mean, self.std, self.interpolation = pp.mean, pp.std, pp.interpolation
        # uint8 -> normalised in one affine step (Preprocessing.affine).
        scale, shift = pp.affine()
        self._scale, self._shift = scale.to(device), shift.to(device)
        # bf16 autocast on CUDA: ~2x throughput, features are stored as float32 anyway. `hold_bf16`
        # then drops the per-forward casts by keeping the weights themselves in bf16.
        self.autocast = device.type == "cuda"
        self.weights_dtype = torch.float32
        self.io = DeviceIO(device)
        self.compile_batch: int | None = None  # set by enable_compile
        self.compile_backend = "inductor"
        self.compile_seconds = 0.0
        self.compile_failed = ""
        self._compiled: dict[tuple[Any, ...], Any] = {}  # forward key -> compiled fn (None: failed, eager)

    def __repr__(self) -> str:
        return f"FrozenEncoder({self.spec.name}, weights={self.weights.source}, device={self.device})"

    # -- checks ----------------------------------------------------------------------------------
    def check_resolution(self, resolution: int) -> int:
        p = self.spec.input_multiple
        if resolution <= 0 or resolution % p:
            lo, hi = max(p, resolution - resolution % p), resolution - resolution % p + p
            what = "patch size" if self.spec.arch == "vit" else "output stride"
            raise ConfigError(f"resolution {resolution} is not a multiple of {p} (the {what} of "
                              f"{self.spec.name}); use {lo} or {hi}")
        return resolution

    # Planners read these from the spec without building a model (tasks/encoders/spec.py).
    def resolve_pooling(self, pooling: str) -> str:
        return self.spec.resolve_pooling(pooling)

    def embedding_dim(self, pooling: str) -> int:
        return self.spec.embedding_dim(pooling)

    def preprocess_info(self) -> dict[str, Any]:
        return self.spec.preprocess_info()

    # -- precision and compilation ---------------------------------------------------------------
    def hold_bf16(self) -> None:
        """Keep the weights in bf16 (half the memory, no cast per forward; docs/gpu.md). Called once
        the weights digest has been taken from the loaded state dict, which stays the identity."""
        if self.device.type == "meta":
            return
        self.model.to(torch.bfloat16)
        self.weights_dtype = torch.bfloat16
        self.autocast = True  # "computes in bf16": what encoder_precision reports

    def enable_compile(self, batch_size: int, backend: str | None = None) -> None:
        """Compile the forward passes with fixed batch shapes: every call is padded to
        `batch_size` (padding dropped from the output). On CUDA: inductor with CUDA graphs
        ("reduce-overhead"), where eager launch overhead leaves small encoders far under the chip's
        rate. Compiling happens at a forward's first call; `compile_seconds` sums the time it took,
        and a model that fails to compile runs eager with a warning (`compile_failed`)."""
        self.compile_batch = int(batch_size)
        self.compile_backend = backend or "inductor"

    def _run(self, key: tuple[Any, ...], fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """fn(x) on the device, under bf16 autocast when the weights are fp32 and autocast is on."""
        cast = self.autocast and self.weights_dtype == torch.float32 and self.device.type == "cuda"
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=cast):
            if self.compile_batch is None or self._compiled.get(key, True) is None:
                return fn(x)
            return self._run_compiled(key, fn, x)

    def _run_compiled(self, key: tuple[Any, ...], fn: Callable[[torch.Tensor], torch.Tensor],
                      x: torch.Tensor) -> torch.Tensor:
        cb, n = int(self.compile_batch or 1), int(x.shape[0])
        if n > cb:
            return torch.cat([self._run_compiled(key, fn, x[i:i + cb]) for i in range(0, n, cb)])
        padded = x if n == cb else torch.cat([x, x.new_zeros((cb - n, *x.shape[1:]))])
        cfn = self._compiled.get(key)
        if cfn is not None:
            return self._call_compiled(cfn, padded)[:n]
        mode = "reduce-overhead" if self.device.type == "cuda" and self.compile_backend == "inductor" else None
        t0 = time.perf_counter()
        try:
            cfn = torch.compile(fn, mode=mode, dynamic=False, backend=self.compile_backend)
            out = self._call_compiled(cfn, padded)
            self._call_compiled(cfn, padded)  # CUDA graphs record on the 2nd call: part of compiling
            out = self._call_compiled(cfn, padded)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
        except Exception as e:  # noqa: BLE001 - any compiler failure: the eager forward is still right
            self._compiled[key] = None
            self.compile_failed = f"{type(e).__name__}: {e}"[:500]
            warnings.warn(f"{self.spec.name}: torch.compile failed ({self.compile_failed}); running eager",
                          RuntimeWarning, stacklevel=2)
            return fn(x)
        self.compile_seconds += time.perf_counter() - t0
        self._compiled[key] = cfn
        return out[:n]

    def _call_compiled(self, cfn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cuda":
            torch.compiler.cudagraph_mark_step_begin()
        # A CUDA graph's output lives in its static pool, overwritten by the next replay: clone it
        # on the compute stream (a device copy, microseconds) before anything else reads it.
        return cfn(x).clone()

    # -- forward ---------------------------------------------------------------------------------
    def _checked(self, x: np.ndarray | torch.Tensor) -> torch.Tensor:
        """A checked uint8 batch (B, 3, H, W), where it was (host or device)."""
        x = torch.as_tensor(x)
        if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected a uint8 batch (B, 3, H, W), got {tuple(x.shape)} {x.dtype}")
        self.check_resolution(int(x.shape[2]))
        self.check_resolution(int(x.shape[3]))
        return x

    def _prepared(self, xd: torch.Tensor) -> torch.Tensor:
        """uint8 on the device -> normalised with the weights' mean/std (in fp32, then the weights' dtype)."""
        return (xd.float() * self._scale + self._shift).to(self.weights_dtype)

    def _normalised(self, x: np.ndarray | torch.Tensor) -> torch.Tensor:
        x = self._checked(x)
        return self._prepared(x.to(self.device) if x.device != self.device else x)

    def _embed_fn(self, pooling: str) -> Callable[[torch.Tensor], torch.Tensor]:
        spec, model = self.spec, self.model

        def embed(x: torch.Tensor) -> torch.Tensor:
            feats = spec.ops.tokens(model, x)
            if spec.arch == "convnet" or pooling == "head":
                out = spec.ops.head(model, feats)
            else:
                cls, patches = feats[:, 0], feats[:, spec.prefix_tokens:].mean(dim=1)
                out = {"cls": cls, "mean": patches, "cls+mean": torch.cat([cls, patches], dim=1)}[pooling]
            return out.float()  # embeddings are stored float32

        return embed

    def _dense_fn(self, layers: tuple[int, ...] | None, dtype: torch.dtype) -> Callable[[torch.Tensor], torch.Tensor]:
        """x -> maps (B, C, H/p, W/p) in `dtype`, cast on the device (fp16 maps leave it at half the bytes)."""
        spec, model = self.spec, self.model

        def dense(x: torch.Tensor) -> torch.Tensor:
            if layers is not None:
                maps = spec.ops.intermediates(model, x, list(layers))
                return torch.cat([m.to(dtype) for m in maps], dim=1).contiguous()
            feats = spec.ops.tokens(model, x)
            if spec.arch == "convnet":
                return feats.to(dtype).contiguous()
            patches = feats[:, spec.prefix_tokens:]
            b, _, d = patches.shape
            h, w = int(x.shape[2]) // spec.patch_size, int(x.shape[3]) // spec.patch_size
            return patches.to(dtype).transpose(1, 2).reshape(b, d, h, w).contiguous()

        return dense

    def embed(self, x: np.ndarray | torch.Tensor, pooling: str = "auto") -> np.ndarray:
        """Global embeddings, float32 (B, D'), with explicit pooling (never a library's silent default):
        `head` the model's own pooled embedding, `cls` the CLS token, `mean` the mean patch token
        (convnets: their global pool), `cls+mean` both concatenated."""
        return next(self.embed_stream([x], pooling))

    def embed_stream(self, batches: Iterable[np.ndarray | torch.Tensor], pooling: str = "auto") -> Iterator[np.ndarray]:
        """`embed` of each batch, pipelined on CUDA (pinned copies in and out, one batch in flight)."""
        pooling = self.resolve_pooling(pooling)
        fn, key = self._embed_fn(pooling), ("embed", pooling)
        for out in stream(self.io, (self._checked(b) for b in batches), lambda xd: self._run(key, fn, self._prepared(xd))):
            # A copy out of the pinned buffer (B x D floats): callers keep it in Arrow tables.
            yield np.array(out.numpy(), dtype=np.float32)

    def dense(self, x: np.ndarray | torch.Tensor, layers: Sequence[int] | None = None,
              dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Patch-feature grid (B, C, H/p, W/p) on the encoder's device, float32 unless `dtype` says
        otherwise, for dense heads (segmentation, registration): online features stay on the device.

        `layers` None: the last block's normed tokens (what `embed` pools). Otherwise the listed
        blocks' tokens (timm `forward_intermediates`, final norm applied to each), concatenated on
        channels in the order given: C = len(layers) x width, for decoders with skips."""
        idx = self.check_layers(layers)
        return self._run(("dense", idx, dtype), self._dense_fn(idx, dtype), self._normalised(x))

    def dense_stream(self, batches: Iterable[np.ndarray | torch.Tensor], layers: Sequence[int] | None = None,
                     dtype: torch.dtype = torch.float16) -> Iterator[torch.Tensor]:
        """`dense` of each batch on the host, cast to `dtype` (the cache's fp16) on the device and
        copied into pinned buffers while the next batch is computed."""
        idx = self.check_layers(layers)
        fn, key = self._dense_fn(idx, dtype), ("dense", idx, dtype)
        yield from stream(self.io, (self._checked(b) for b in batches), lambda xd: self._run(key, fn, self._prepared(xd)))

    def check_layers(self, layers: Sequence[int] | None) -> tuple[int, ...] | None:
        """Block indices for `dense` (negative counts from the end), validated; None = last block."""
        if layers is None:
            return None
        if self.spec.arch != "vit":
            raise ConfigError(f"{self.spec.name}: intermediate layers are available for ViT encoders only")
        depth = self.spec.depth
        out = []
        for i in layers:
            j = int(i) + depth if int(i) < 0 else int(i)
            if not 0 <= j < depth:
                raise ConfigError(f"{self.spec.name} has {depth} blocks; layer {i} does not exist")
            out.append(j)
        return tuple(out)
