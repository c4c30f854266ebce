"""Extraction at the device's pace: the extraction actors' own classes on already-decoded batches.

Runs `EncoderUDF` and `DenseEncoderUDF` (orchestrator/extraction/images.py, dense.py) as a Ray actor
would, on uint8 batches in host memory, with neither Ray nor MLflow imported (torch, timm, numpy,
pyarrow), so it runs on any machine that has a GPU and these. Per (encoder, resolution):

- actor img/s: `EncoderUDF.__call__` on a batch dict (pinned copies, bf16 weights, compiled forward
  at the actor's piece size on CUDA), output an Arrow table in host memory;
- bare bf16 forward: the same encoder eager, input already on the device, outputs left there;
- compiled forward: the actor's own compiled function, input on the device (its compile time apart);
- MFU: GFLOPs per image x img/s against a bf16 8192^3 matmul measured in the same run.

Dense maps (`dense:` items of `--plan`, 4 blocks): `DenseEncoderUDF._encode` (fp16 on the device, pinned
copies out), the whole actor call writing one .npy per case to `--out-dir`, the GPU-only
`forward_intermediates` (maps left on the device), and the old path (float32 maps to pageable memory).

`--quick` runs on CPU with the tiny test encoder and checks that the pinned/stream, fp16, bf16 and
compiled paths give the eager outputs within tolerance (tests/test_gpu_extract.py runs it).

    python benchmarks/gpu_extract.py [--quick] [--plan embed:dinov3_vits16:224:256,dense:dinov3_vits16:512:16]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from orchestrator.extraction.dense import DenseEncoderUDF  # noqa: E402
from orchestrator.extraction.images import EncoderUDF  # noqa: E402

POOLING = "cls+mean"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rate(fn: Callable[[], Any], images: int, device: torch.device, seconds: float, min_iters: int = 3) -> float:
    """Images/s of `fn` (one call = `images` images) over at least `seconds` and `min_iters` calls,
    after one warm-up call."""
    fn()
    sync(device)
    n, t0 = 0, time.perf_counter()
    while n < min_iters or time.perf_counter() - t0 < seconds:
        fn()
        n += 1
    sync(device)
    return n * images / (time.perf_counter() - t0)


def matmul_tflops(device: torch.device, seconds: float) -> float:
    """bf16 8192^3 matmul TFLOP/s on a GPU (the MFU reference); float32 1024^3 on a CPU."""
    n, dt = (8192, torch.bfloat16) if device.type == "cuda" else (1024, torch.float32)
    a = torch.randn(n, n, device=device, dtype=dt)
    b = torch.randn(n, n, device=device, dtype=dt)
    return rate(lambda: a @ b, 1, device, seconds, min_iters=10) * 2 * n ** 3 / 1e12


def pixels(n: int, r: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 3, r, r), dtype=np.uint8)


def image_batch(px: np.ndarray) -> dict[str, Any]:
    """A batch of images already at the encoder's size, uint8 (B, 3, r, r): the actor's forward
    path alone (decode.decode_batch now hands over full-size images and the actor resizes them on
    its device first, tasks/device_resize.py; that resize is not timed here)."""
    n = len(px)
    return {"case_id": [f"c{i}" for i in range(n)], "split": ["train"] * n, "patient_id": [f"p{i}" for i in range(n)],
            "target": [[0]] * n, "error": np.array([""] * n, dtype=object), "pixels": px}


def case_batch(px: np.ndarray) -> dict[str, Any]:
    """2D dense cases (one grey modality, one slice each) as decode_cases hands them over."""
    cases = np.empty(len(px), dtype=object)
    cases[:] = [p[None, None] for p in px]
    return {"case_id": np.array([f"c{i}" for i in range(len(px))], dtype=object), "pixels": cases,
            "error": np.array([""] * len(px), dtype=object)}


def gflops_of(encoder: str, r: int) -> float:
    from tasks.encoders import get_encoder_spec

    try:
        return float(get_encoder_spec(encoder).gflops(r))
    except Exception:  # noqa: BLE001 - MFU is then left out, the rates still count
        return float("nan")


def rel_err(a: Any, b: Any) -> float:
    """max |a - b| / max |b|."""
    a = a.float().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a, np.float32)
    b = b.float().cpu().numpy() if isinstance(b, torch.Tensor) else np.asarray(b, np.float32)
    return float(np.abs(a - b).max() / max(float(np.abs(b).max()), 1e-12))


def bench_embed(encoder: str, r: int, batch: int, args: argparse.Namespace, peak: float,
                check: bool = False) -> dict[str, Any]:
    cuda = torch.cuda.is_available()
    udf = EncoderUDF(encoder, "random", POOLING, "", expected_precision="bf16" if cuda else None,
                     compile=cuda and not args.no_compile, batch_size=batch, chunks=args.chunks)
    enc, dev = udf.encoder, udf.encoder.device
    px = pixels(batch, r)
    b = image_batch(px)
    t0 = time.perf_counter()
    udf(b)  # first call: compiles (CUDA) -- timed apart
    first = time.perf_counter() - t0
    actor = rate(lambda: udf(b), batch, dev, args.seconds)
    xd = enc._prepared(torch.from_numpy(px).to(dev))
    fn, key = enc._embed_fn(POOLING), ("embed", POOLING)
    compiled = float("nan")
    if enc.compile_batch is not None and enc._compiled.get(key) is not None:
        piece = xd[:enc.compile_batch]
        compiled = rate(lambda: enc._run(key, fn, piece), len(piece), dev, args.seconds)
    cb, enc.compile_batch = enc.compile_batch, None
    eager = rate(lambda: enc._run(key, fn, xd), batch, dev, args.seconds)
    errs = {"err_compiled_vs_eager": float("nan"), "err_actor_vs_fp32": float("nan")}
    if cb is not None:  # same bf16 weights, compiled against eager
        ref = enc._run(key, fn, xd[:cb])
        enc.compile_batch = cb
        errs["err_compiled_vs_eager"] = rel_err(enc._run(key, fn, xd[:cb]), ref)
    enc.compile_batch = cb
    if check:  # the actor's table against an fp32 encoder, autocast off, on the same device
        from tasks.encoders import create_encoder

        fp32 = create_encoder(encoder, device=dev)
        fp32.autocast = False
        k = min(16, len(px))
        got = udf(image_batch(px[:k])).column("embedding").combine_chunks().flatten().to_numpy()
        errs["err_actor_vs_fp32"] = rel_err(got.reshape(k, -1), fp32.embed(px[:k], POOLING))
        del fp32
    gf = gflops_of(encoder, r)
    return {"what": "embed", "encoder": encoder, "px": r, "batch": batch, "piece": enc.compile_batch or batch,
            "actor": actor, "eager_bf16": eager, "compiled": compiled, "compile_s": enc.compile_seconds,
            "first_call_s": first, "compile_failed": enc.compile_failed, "gflops": gf,
            "mfu_actor": actor * gf / 1e3 / peak, "mfu_eager": eager * gf / 1e3 / peak,
            "mfu_compiled": compiled * gf / 1e3 / peak, **errs}


def bench_dense(encoder: str, r: int, batch: int, args: argparse.Namespace, out_dir: str) -> dict[str, Any]:
    cuda = torch.cuda.is_available()
    from tasks.encoders import get_encoder_spec

    depth = get_encoder_spec(encoder).depth
    layers = ",".join(str(depth * (i + 1) // 4 - 1) for i in range(4))  # 4 blocks, as a decoder with skips
    udf = DenseEncoderUDF(encoder, "random", "", layers, out_dir, "bf16" if cuda else "fp32",
                          batch_size=batch, compile=False)
    enc, dev = udf.encoder, udf.encoder.device
    n = batch * args.dense_batches
    px = pixels(n, r)
    cases = [(f"c{i}", px[i][None, None]) for i in range(n)]
    encode_only = rate(lambda: udf._encode(cases), n, dev, args.seconds)
    write = rate(lambda: udf(case_batch(px)), n, dev, args.seconds, min_iters=2)
    idx = enc.check_layers(udf.layers)
    fn, key = enc._dense_fn(idx, torch.float16), ("dense", idx, torch.float16)
    xd = enc._prepared(torch.from_numpy(px[:batch]).to(dev))
    gpu_only = rate(lambda: enc._run(key, fn, xd), batch, dev, args.seconds)
    old = rate(lambda: enc.dense(px[:batch], layers=udf.layers).cpu(), batch, dev, args.seconds)
    mb = enc.dense(px[:1], layers=udf.layers).numel() * 2 / 1e6
    return {"what": "dense", "encoder": encoder, "px": r, "batch": batch, "layers": layers, "mb_per_image": mb,
            "actor_encode": encode_only, "actor_write": write, "gpu_only": gpu_only, "old_fp32_pageable": old}


def quick_checks() -> dict[str, float]:
    """CPU: every path against the eager fp32 reference. Returns {check: relative max error}."""
    from tasks.encoders import create_encoder

    torch.manual_seed(0)
    name, r = "test_vit_tiny16", 32
    px = pixels(5, r, seed=1)
    ref = create_encoder(name, device="cpu")
    e_ref, d_ref = ref.embed(px, POOLING), ref.dense(px, layers=[0, -1])

    out: dict[str, float] = {}
    udf = EncoderUDF(name, "random", POOLING, "", chunks=2)  # streamed in two pieces
    emb = udf(image_batch(px)).column("embedding").combine_chunks().flatten().to_numpy().reshape(5, -1)
    out["actor_stream_fp32"] = rel_err(emb, e_ref)
    udf.encoder.enable_compile(4, backend="aot_eager")  # inductor on CPU takes minutes; CUDA uses it
    out["compiled_padded"] = rel_err(udf.embed(px), e_ref)  # pieces of 3 and 2 images, each padded to 4
    out["compile_ok"] = float(bool(udf.encoder.compile_failed))
    bad = create_encoder(name, device="cpu")
    bad.enable_compile(4, backend="no_such_backend")  # fails: must fall back to eager, with a warning
    out["compile_fallback"] = rel_err(bad.embed(px, POOLING), e_ref)
    out["fallback_recorded"] = float(not bad.compile_failed)
    dense = np.concatenate([m.float().numpy() for m in ref.dense_stream([px[:3], px[3:]], layers=[0, -1])])
    out["dense_fp16_stream"] = rel_err(dense, d_ref)
    with tempfile.TemporaryDirectory() as tmp:
        dudf = DenseEncoderUDF(name, "random", "", "0,-1", tmp, "fp32", batch_size=2)
        rows = dudf(case_batch(px))
        files = [np.load(f"{tmp}/{f}") for f in rows["file"]]
        out["dense_actor_files"] = rel_err(np.concatenate(files), d_ref)
    b16 = create_encoder(name, device="cpu")
    b16.hold_bf16()
    out["bf16_weights"] = rel_err(b16.embed(px, POOLING), e_ref)
    return out


# Most wanted first: a run that hits --budget-s still has the rows that matter most.
DEFAULT_PLAN = ("embed:dinov3_vitb16:224:256,embed:dinov3_vitl16:512:64,dense:dinov3_vits16:512:16,"
                "embed:dinov3_vits16:224:256,embed:dinov3_vitb16:512:64,embed:dinov3_vitl16:224:256,"
                "dense:dinov3_vitb16:512:16,embed:dinov3_vits16:512:64")


def free_compiled(device: torch.device) -> None:
    """Forget compiled graphs between configurations: dynamo's cache keeps each model alive, and
    one code object compiled for more models than its recompile limit would silently run eager."""
    import gc

    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


QUICK_LIMITS = {"actor_stream_fp32": 1e-5, "compiled_padded": 1e-5, "compile_ok": 0.5, "compile_fallback": 1e-5,
                "fallback_recorded": 0.5, "dense_fp16_stream": 1e-3, "dense_actor_files": 1e-3,
                "bf16_weights": 3e-2}


def print_row(row: dict[str, Any]) -> None:
    print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="CPU correctness checks with the tiny encoder")
    ap.add_argument("--plan", default=DEFAULT_PLAN, help="what to measure, in order: embed|dense:encoder:px:batch,...")
    ap.add_argument("--dense-batches", type=int, default=4, help="batches per dense actor call")
    ap.add_argument("--chunks", type=int, default=None, help="pieces per actor batch (default: the actor's)")
    ap.add_argument("--seconds", type=float, default=2.0, help="timing window per measurement")
    ap.add_argument("--budget-s", type=float, default=1e9, help="skip what is left after this many seconds")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--out-dir", default=None, help="where dense maps are written (default: a temp dir)")
    args = ap.parse_args()
    if args.quick:
        errors = quick_checks()
        for k, v in errors.items():
            print(f"{k}: {v:.3g} (limit {QUICK_LIMITS[k]:g}) {'ok' if v <= QUICK_LIMITS[k] else 'FAIL'}")
        sys.exit(0 if all(v <= QUICK_LIMITS[k] for k, v in errors.items()) else 1)
    # Each configuration compiles the same code objects for another model; free_compiled resets
    # between them, and a generous limit keeps one configuration's pieces from falling back to eager.
    for knob in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, knob):
            setattr(torch._dynamo.config, knob, 64)
    t_start = time.perf_counter()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    print(f"device={name} torch={torch.__version__} timm={__import__('timm').__version__}", flush=True)
    peak = matmul_tflops(dev, 2.0)
    print(f"matmul_tflops={peak:.1f} ({'bf16 8192^3' if dev.type == 'cuda' else 'fp32 1024^3'})", flush=True)
    out = args.out_dir or tempfile.mkdtemp(prefix="gpu_extract_")
    checked = False  # the first embed configuration is also checked against fp32
    for item in args.plan.split(","):
        what, encoder, r, batch = item.split(":")
        if time.perf_counter() - t_start > args.budget_s:
            print(f"skipped {item}: over --budget-s", flush=True)
            continue
        try:
            if what == "embed":
                print_row(bench_embed(encoder, int(r), int(batch), args, peak, check=not checked))
                checked = True
            else:
                print_row(bench_dense(encoder, int(r), int(batch), args, out))
        except Exception as e:  # noqa: BLE001 - one configuration fails alone; the others still run
            print(f"FAILED {item}: {type(e).__name__}: {e}", flush=True)
        free_compiled(dev)
    print(f"total_s={time.perf_counter() - t_start:.0f}", flush=True)


if __name__ == "__main__":
    main()
