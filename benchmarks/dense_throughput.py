"""Dense-feature pipeline throughput, and the memory of cells that read dense maps and slide bags.

1. Throughput. The pipeline (what a dense extraction runs, `pipelines.run_dense_pipeline` +
   `extraction.dense.commit_dense`): case rows -> `read_sample` + resize on CPU workers -> encoder
   actor pool -> one fp16 `(S, C, h, w)` `.npy` file per case + `index.parquet`, committed into the
   cache. The bare baseline runs the encoder's `dense` forward alone on the same images, already
   decoded and resized in memory, before and after the pipeline (averaged). Same machine, encoder,
   resolution, batch size, torch threads; Ray start-up excluded. Steady state as in
   ct_throughput.py: a short run measures the fixed start-up cost, the full run the rest; the
   rate is the marginal one. Last line of this part: `ratio=<pipeline / bare images/s>` (target
   >= 0.85 for dinov3_vits16 at 224 px).
2. Decoder-cell memory. A dense cell (`cells.dense.run_dense_cell`, cached source) on N and on 4N
   cases, each in a fresh process; its peak RSS (the process's high-water mark, VmHWM) should stay
   within +10% (maps memory-mapped one case at a time). The entry's maps are written directly
   (random fp16 in commit_dense's layout: this part measures reading, not encoding) with 4 blocks
   of ViT-S (a decoder with skips: 4 x 384 channels, 0.6 MB a case at 224 px), so a cell that held
   its cases would show it. The head is the test suite's 1x1-conv head (tests/dense_toy.py), which
   reads one case per step.
3. ABMIL-cell memory. An ABMIL cell (`cells.bags.run_bag_cell`) on S and 4S slides of synthetic
   fp16 bags (`--tiles` tiles of 768 features, cls+mean of ViT-S, written in the bag entry layout)
   in fresh processes; peak RSS within +10% (bags read one slide at a time).

    python benchmarks/dense_throughput.py [--images 384] [--short 24] [--cases 100] [--slides 24] [--only ...]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

from benchmarks.common import PeakRSS, bare_rate  # noqa: E402

SKIP_LAYERS = "2,5,8,11"


def _key(info, job, layers: str, dataset: str, fingerprint: str):
    from orchestrator.store.cache import CacheKey
    from tasks.preprocess import PREPROCESS_VERSION

    return CacheKey(job.encoder, "random", info["digest"], job.resolution, "patch", PREPROCESS_VERSION, dataset,
                    fingerprint, "cases", feature_kind="dense", layers=layers, precision="fp32")


def _extract(cache, ds, ids, job, info, layers: str, batch: int, threads: int) -> float:
    """The dense pipeline on `ids`, committed into `cache`; returns the seconds it took."""
    from orchestrator.extraction import pipelines
    from orchestrator.extraction.dense import commit_dense, dataset_ref

    scratch = cache.scratch_dir()
    t0 = time.perf_counter()
    rows = pipelines.run_dense_pipeline(
        [{"case_id": c} for c in ids], dataset=json.dumps(dataset_ref(ds)), job=job, layers=layers, precision="fp32",
        interpolation=info.get("interpolation", "bicubic"), expected_digest=info["digest"], out_uri=scratch,
        batch_size=batch, cases_per_batch=batch, actors=1, gpus_per_actor=0.0, torch_threads=threads)
    commit_dense(cache, _key(info, job, layers, ds.name, ds.fingerprint() + f"-{len(ids)}-{time.time()}"),
                 scratch, rows, {"weights_source": "random"})
    return time.perf_counter() - t0


def _child(kind: str, spec_file: str) -> None:
    """Run one cell in this (fresh) process and print its peak RSS."""
    import torch

    from orchestrator.store.results import ResultStore

    spec = json.loads(Path(spec_file).read_text())
    torch.set_num_threads(spec.pop("threads"))
    results = ResultStore(spec["results_dir"])
    t0 = time.perf_counter()
    if kind == "dense":
        from orchestrator.cells.dense import run_dense_cell

        m = run_dense_cell(spec, results, None)
    else:
        from orchestrator.cells.bags import run_bag_cell

        m = run_bag_cell(spec, results, None)
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss across exec, so a child would report its
    # parent's (this benchmark's) peak; VmHWM belongs to this process's own address space.
    with open("/proc/self/status") as f:
        peak = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    print(json.dumps({"peak": peak, "seconds": time.perf_counter() - t0, "n_train": m.get("n_train")}))


def _run_child(kind: str, spec: dict, work: Path, tag: str) -> dict:
    f = work / f"spec-{kind}-{tag}.json"
    f.write_text(json.dumps(spec))
    out = subprocess.run([sys.executable, __file__, "--child", kind, str(f)], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    if out.returncode:
        raise RuntimeError(f"{kind} cell ({tag}) failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def throughput(args, work: Path) -> None:
    import numpy as np

    from orchestrator import ray_backend
    from orchestrator.extraction.jobs import ExtractionJob
    from orchestrator.extraction.weights import DigestMemo, weights_info
    from orchestrator.store.cache import FeatureCache
    from tasks.features import prepare_slices
    from tests.dense_toy import ToyDense

    root = ToyDense.synth(work / "toy", n=args.images, image_size=args.resolution)
    ds = ToyDense(root)
    ids = ds.index()["case_id"].tolist()
    pixels = np.concatenate([prepare_slices(ds.read_sample(c).images, args.resolution)[0] for c in ids])
    print(f"wrote {len(ids)} synthetic RGB PNGs of {args.resolution}x{args.resolution}-{args.resolution + 32} px")

    def bare(when: str) -> float:
        return bare_rate(when, args.encoder, pixels, args.batch_size, args.threads, "images",
                         f"{len(pixels)} images, dense maps", layers=None)

    bare_before = bare("before")
    t0 = time.perf_counter()
    ray_backend.start("local", num_cpus=os.cpu_count())
    print(f"ray start: {time.perf_counter() - t0:.1f} s (excluded)")
    info = weights_info(args.encoder, "random", DigestMemo(work / "digests.json"))
    job = ExtractionJob(args.encoder, "random", args.resolution, "patch", ds.name, str(root))
    cache = FeatureCache(str(work / "cache"))

    def run(k: int, tag: str) -> float:
        with PeakRSS() as rss:
            dt = _extract(cache, ds, ids[:k], job, info, "", args.batch_size, args.threads)
        print(f"  {tag}: {k} images in {dt:.1f} s, peak RSS (driver + Ray) {rss.peak / 2**20:.0f} MiB")
        return dt

    run(args.short, "warm-up (not measured)")
    t_short, t_full = run(args.short, "short"), run(args.images, "full")
    steady = (args.images - args.short) / (t_full - t_short)
    print(f"pipeline end to end: {args.images} images in {t_full:.1f} s = {args.images / t_full:.2f} images/s "
          f"(read, resize, encode, fp16 .npy per case, index, commit)")
    print(f"pipeline start-up: {t_short - args.short / steady:.1f} s per extraction")
    print(f"pipeline steady state: {steady:.2f} images/s")
    ray_backend.stop()
    base = (bare_before + bare("after")) / 2
    print(f"ratio={steady / base:.3f}")


def decoder_memory(args, work: Path) -> None:
    """The cell reads a dense cache entry; its maps are written here directly (random fp16, the
    entry layout commit_dense makes), so this part measures reading and training, not encoding."""
    from dataclasses import asdict

    import numpy as np

    from orchestrator.extraction.dense import class_path, commit_dense, dataset_ref
    from orchestrator.extraction.jobs import ExtractionJob
    from orchestrator.store.cache import FeatureCache
    from orchestrator.store.dense_maps import case_file
    from orchestrator.store.storage import write_bytes
    from tests.dense_toy import ToyDense, ToyHandler, ToyHead

    cache = FeatureCache(str(work / "cache"))
    grid, channels = args.resolution // 16, 4 * 384  # ViT-S/16, blocks 2, 5, 8, 11
    info = {"digest": "0" * 64}
    rng = np.random.default_rng(0)
    peaks = {}
    for mult in (1, 4):
        n = args.cases * mult
        root = ToyDense.synth(work / f"cells{mult}", n=n, image_size=args.resolution)
        ds = ToyDense(root)
        job = ExtractionJob(args.encoder, "random", args.resolution, "patch", ds.name, str(root))
        scratch, rows = cache.scratch_dir(), []
        for c in ds.index()["case_id"]:
            buf = io.BytesIO()
            np.save(buf, rng.normal(size=(1, channels, grid, grid)).astype(np.float16))
            write_bytes(cache.fs, f"{scratch}/{case_file(c)}", buf.getvalue())
            rows.append({"case_id": c, "file": case_file(c), "n_slices": 1, "channels": channels, "grid": grid,
                         "error": ""})
        key = _key(info, job, SKIP_LAYERS, ds.name, ds.fingerprint())
        commit_dense(cache, key, scratch, rows, {"weights_source": "random"})
        spec = {"cell_id": f"dense{mult}", "encoder": args.encoder, "resolution": args.resolution, "seed": 0,
                "cache_root": cache.root, "results_dir": str(work / "results"), "threads": args.threads,
                "hparams": {"epochs": 3, "layers": [2, 5, 8, 11]},
                "dense": {"source": "cached", "reason": "benchmark", "planned_bytes": 0, "key": asdict(key),
                          "layers": SKIP_LAYERS, "dataset": dataset_ref(ds), "protocol_cls": class_path(ToyHead),
                          "family": "dense", "handler_cls": class_path(ToyHandler), "target_kind": "mask2d",
                          "weights": "random", "expected_digest": info["digest"], "precision": "fp32"}}
        r = _run_child("dense", spec, work, str(mult))
        peaks[mult] = r["peak"]
        size = sum(f.stat().st_size for f in Path(cache.entry_path(key)).glob("maps/*.npy"))
        print(f"decoder cell on {n} cases ({size / 2**20:.0f} MiB of fp16 maps, {channels} channels, "
              f"{grid}x{grid}): peak RSS {r['peak'] / 2**20:.0f} MiB, {r['seconds']:.1f} s")
    print(f"decoder cell peak RSS 4x vs 1x cases: {100 * (peaks[4] / peaks[1] - 1):+.1f}%")


def abmil_memory(args, work: Path) -> None:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from orchestrator.store.cache import CacheKey, FeatureCache

    cache = FeatureCache(str(work / "bagcache"))
    rng = np.random.default_rng(0)
    peaks = {}
    for mult in (1, 4):
        n = args.slides * mult
        key = CacheKey(args.encoder, "random", "0" * 64, 224, "cls+mean", "bench", f"bags{mult}", "x", "slides",
                       feature_kind="bag")
        scratch = cache.scratch_dir()
        cases = []
        for i in range(n):
            y = i % 2
            emb = rng.normal(size=(args.tiles, 768)).astype(np.float16)
            emb[: args.tiles // 10, :8] += 3 * y  # a learnable signal in a tenth of the tiles
            xs = np.arange(args.tiles, dtype=np.int64)
            t = pa.table({"x": xs % 100, "y": xs // 100, "error": [""] * args.tiles,
                          "embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb.ravel()), 768)})
            d = Path(scratch) / f"case_id=s{i:04d}"
            d.mkdir(parents=True)
            pq.write_table(t, d / "part-0.parquet")
            cases.append({"case_id": f"s{i:04d}", "path": "", "split": ("train", "train", "val", "test")[i % 4],
                          "patient_id": f"p{i}", "target": [y]})
        cache.commit(key, scratch, {"n_tiles": {c["case_id"]: args.tiles for c in cases}, "failed": {}})
        spec = {"cell_id": f"abmil{mult}", "protocol": "abmil", "seed": 0, "task": "binary", "classes": ["tumor"],
                "hparams": {"epochs": 3, "patience": 3}, "cache_root": cache.root, "results_dir": str(work / "results"),
                "keys": {"slides": key.__dict__}, "cases": cases, "ood": [], "coords_uri": "",
                "dataset": "bench", "threads": args.threads}
        r = _run_child("bag", spec, work, str(mult))
        peaks[mult] = r["peak"]
        print(f"ABMIL cell on {n} slides x {args.tiles} tiles ({n * args.tiles * 768 * 2 / 2**20:.0f} MiB of fp16 "
              f"bags): peak RSS {r['peak'] / 2**20:.0f} MiB, {r['seconds']:.1f} s")
    print(f"ABMIL cell peak RSS 4x vs 1x slides: {100 * (peaks[4] / peaks[1] - 1):+.1f}%")


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        return _child(sys.argv[2], sys.argv[3])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--encoder", default="dinov3_vits16")
    ap.add_argument("--resolution", type=int, default=224)
    ap.add_argument("--batch-size", type=int, default=32)
    # 384: the marginal part of the run (images - short) lasts ~25 s at CPU rates. The start-up it
    # subtracts (actor, weights, first decode) varied by ~0.7 s between runs on a quiet 2-core VM
    # while the actor encoded without gaps at the bare rate; over the ~5 s of the old 96-image
    # default that swung the ratio from 0.79 to 0.93.
    ap.add_argument("--images", type=int, default=384, help="images of the full throughput run")
    ap.add_argument("--short", type=int, default=24, help="images of the short run (start-up)")
    ap.add_argument("--cases", type=int, default=100, help="cases of the 1x decoder cell (4x: 4 times as many)")
    ap.add_argument("--slides", type=int, default=24, help="slides of the 1x ABMIL cell")
    ap.add_argument("--tiles", type=int, default=2000, help="tiles per synthetic slide bag")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (both sides)")
    ap.add_argument("--only", choices=("throughput", "decoder", "abmil"), default=None)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="medscale-densebench-"))
    if args.only in (None, "throughput"):
        throughput(args, work)
    if args.only in (None, "decoder"):
        decoder_memory(args, work)
    if args.only in (None, "abmil"):
        abmil_memory(args, work)


if __name__ == "__main__":
    main()
