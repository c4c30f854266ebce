"""AutoLaparo task 1 (surgical phase recognition, laparoscopic hysterectomy), 7 phases, multiclass.

Published layout (autolaparo.github.io, "Task 1 - Surgical workflow recognition"):

    root/videos/01.mp4 ... 21.mp4          25 fps (1920x1080 H.264 in the release)
    root/labels/label_01.txt ... label_21.txt   "Frame<TAB>Phase" header, then one row per second
                                                 (annotations at 1 fps; phase 1..7)

Rows of the index are FRAMES sampled at 1 fps: one per label row, `path` = "<video>#t=<second>"
(the frame shown at that second: the first frame whose timestamp is >= t). Frames are decoded
with PyAV, streaming: a batch of frames of one video is read by one seek and a forward decode, so a
whole video is never in memory; each frame is resized to 250x250 as in the paper. The split is the
release's 10/4/7 videos (01-10 train, 11-14 val, 15-21 test); patient_id = video.

Metrics: accuracy, precision, recall, Jaccard over all test frames (macro over phases), plus the
phase-recognition literature's video-wise averages (per video: accuracy, and precision, recall,
Jaccard macro over the phases present in that video; then the mean over videos), reported as
`video_*` metrics by the cells.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from tasks.datasets.base import (
    ImageDataset,
    LayoutFile,
    Problem,
    Report,
    fresh_root,
    make_index,
    register_dataset,
)
from tasks.errors import DatasetError

PHASES = ("Preparation", "Dividing Ligament and Peritoneum", "Dividing Uterine Vessels and Ligament",
          "Transecting the Vagina", "Specimen Removal", "Suturing", "Washing")
N_VIDEOS, FPS, FRAME_SIZE = 21, 25, 250
SPLIT_OF = {v: "train" if v <= 10 else "val" if v <= 14 else "test" for v in range(1, N_VIDEOS + 1)}
_FRAG = re.compile(r"^(.*)#t=(\d+)$")
RESEEK_S = 10  # a gap this long between wanted frames is cheaper to seek over than to decode through


def frame_ref(video: str | os.PathLike, t: int) -> str:
    return f"{video}#t={int(t)}"


def parse_ref(path: str | os.PathLike) -> tuple[str, int]:
    m = _FRAG.match(str(path))
    if m is None:
        raise DatasetError(str(path), "expected a frame reference '<video>#t=<second>'")
    return m.group(1), int(m.group(2))


def read_frames(video: str, times: Sequence[int], size: int | None) -> list[tuple[float, np.ndarray]]:
    """(timestamp, RGB uint8 frame) at each second in `times`: the first frame at or after t.
    Streams: one seek per run of nearby times, then a forward decode; frames are dropped as soon
    as they are passed, so memory is a few frames whatever the video's length."""
    import av

    wanted = sorted(set(int(t) for t in times))
    got: dict[int, tuple[float, np.ndarray]] = {}
    try:
        with av.open(video) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            i = 0
            while i < len(wanted):
                container.seek(int(wanted[i] / stream.time_base), stream=stream, backward=True)
                last = -1.0
                for frame in container.decode(stream):
                    last = frame.time
                    if last < wanted[i] - 1e-6:
                        continue
                    img = frame.to_ndarray(format="rgb24", width=size, height=size) if size else \
                        frame.to_ndarray(format="rgb24")
                    while i < len(wanted) and last >= wanted[i] - 1e-6:
                        got[wanted[i]] = (float(last), img)  # the frame shown at second wanted[i]
                        i += 1
                    if i == len(wanted) or wanted[i] - last > RESEEK_S:
                        break
                else:
                    raise DatasetError(video, f"no frame at t={wanted[i]}s (the video ends at {last:.2f}s)")
    except DatasetError:
        raise
    except FileNotFoundError:
        raise DatasetError(video, "video file is missing") from None
    except Exception as e:  # noqa: BLE001 - FFmpeg errors come in many types
        raise DatasetError(video, f"cannot decode video: {type(e).__name__}: {e}") from e
    return [got[int(t)] for t in times]


@register_dataset
class AutoLaparo(ImageDataset):
    name = "autolaparo"
    task = "multiclass"
    classes = PHASES
    files = tuple(LayoutFile(f"labels/label_{v:02d}.txt", f"phase labels label_{v:02d}.txt (AutoLaparo task 1)",
                             split=True) for v in range(1, N_VIDEOS + 1))
    image_suffix = ".mp4"
    carves_val = False  # the release's 10/4/7 split has its own validation videos
    frame_size = FRAME_SIZE

    def _image_dirs(self) -> list[Path]:
        d = self.root / "videos"
        return [d] if d.is_dir() else []

    def read_image(self, path: str | os.PathLike) -> np.ndarray:
        video, t = parse_ref(path)
        return read_frames(video, [t], self.frame_size)[0][1]

    def read_images(self, paths: Sequence[str]) -> list[np.ndarray]:
        """A batch: one streaming pass per video instead of one seek per frame."""
        refs = [parse_ref(p) for p in paths]
        out: dict[str, np.ndarray] = {}
        for video in dict.fromkeys(v for v, _ in refs):
            ts = [t for v, t in refs if v == video]
            for t, (_, img) in zip(ts, read_frames(video, ts, self.frame_size), strict=True):
                out[frame_ref(video, t)] = img
        return [out[frame_ref(v, t)] for v, t in refs]

    missing_item = "video listed in the labels is missing"

    def _item_file(self, path: str) -> str:
        return parse_ref(path)[0]

    def check(self, decode: bool = True) -> list[Problem]:
        # Every frame of a broken video fails alike: report each (file, message) once.
        return list(dict.fromkeys(super().check(decode)))

    def video_path(self, v: int) -> Path:
        return self.root / "videos" / f"{v:02d}.mp4"

    def _load(self, report: Report) -> pd.DataFrame | None:
        ids, paths, splits, pids, targets = [], [], [], [], []
        ok = True
        for v in range(1, N_VIDEOS + 1):
            lf = self._file(f"labels/label_{v:02d}.txt", report)
            if lf is None:
                ok = False
                continue
            lines = lf.read_text().splitlines()
            if not lines or lines[0].split() != ["Frame", "Phase"]:
                report.add(lf, f"line 1: expected the header 'Frame<TAB>Phase', got {lines[:1]}")
                ok = False
                continue
            for n, line in enumerate(lines[1:], 2):
                parts = line.split()
                if not parts:
                    continue
                if len(parts) != 2 or not parts[0].isdigit() or parts[1] not in {str(k) for k in range(1, 8)}:
                    report.add(lf, f"line {n}: expected '<second><TAB><phase 1-7>', got {line!r}")
                    continue
                t, k = int(parts[0]), int(parts[1]) - 1
                ids.append(f"{v:02d}_{t:06d}")
                paths.append(frame_ref(self.video_path(v), t))
                splits.append(SPLIT_OF[v])
                pids.append(f"{v:02d}")
                targets.append([int(j == k) for j in range(len(PHASES))])
        if not ok:
            return None
        return make_index(ids, paths, splits, pids, targets)

    @classmethod
    def synth(cls, root: str | os.PathLike, n: int = 210, seed: int = 0, image_size: int = 64) -> Path:
        """21 short 25-fps videos holding n labelled seconds in all (written with PyAV, MPEG-4 part 2). Each
        phase tints the view with its own colour and adds a blob at a place of its own; a strip of
        8 black/white blocks along the top encodes the frame number (tests read it back to check
        which frame was sampled). Phases follow each other through a video, starting at a phase
        that rotates with the video, so even short videos cover all 7 phases between them."""
        import av

        root = fresh_root(root)
        (root / "videos").mkdir()
        (root / "labels").mkdir()
        rng = np.random.default_rng(seed)
        c = (np.arange(image_size, dtype=np.float32) + 0.5) / image_size
        x, y = c[None, :], c[:, None]
        tints = np.array([np.cos(np.linspace(0, 2 * np.pi, 7, endpoint=False) + ph) for ph in (0, 2.1, 4.2)]).T
        bw = image_size // 8
        for v in range(1, N_VIDEOS + 1):
            dur = n // N_VIDEOS + (1 if v <= n % N_VIDEOS else 0)
            phases = [(v + (7 * t) // max(dur, 1)) % 7 for t in range(dur)]
            rows = ["Frame\tPhase"] + [f"{t}\t{k + 1}" for t, k in enumerate(phases)]
            (root / "labels" / f"label_{v:02d}.txt").write_text("\n".join(rows) + "\n")
            with av.open(str(root / "videos" / f"{v:02d}.mp4"), "w") as out:
                stream = out.add_stream("mpeg4", rate=FPS, options={"qscale": "2", "g": "50"})
                # MPEG-4 part 2 on one thread: x264 gave different bytes run to run (synth must be deterministic)
                stream.codec_context.thread_count = 1
                stream.width = stream.height = image_size
                stream.pix_fmt = "yuv420p"
                base = np.array([0.7, 0.4, 0.35]) + 0.05 * rng.standard_normal(3)
                for f in range(dur * FPS + FPS // 2):  # half a second past the last labelled second
                    k = phases[min(f // FPS, dur - 1)]
                    ang = 2 * np.pi * k / 7
                    img = base + 0.25 * tints[k] + 0.03 * rng.standard_normal((image_size, image_size, 3))
                    img = img + 0.3 * np.exp(-0.5 * ((x - 0.5 - 0.25 * np.cos(ang)) ** 2 +
                                                     (y - 0.55 - 0.2 * np.sin(ang)) ** 2) / 0.12 ** 2)[..., None]
                    px = np.clip(np.rint(img * 255), 0, 255).astype(np.uint8)
                    for b in range(8):
                        px[:bw, b * bw:(b + 1) * bw] = 255 if (f >> b) & 1 else 0
                    for packet in stream.encode(av.VideoFrame.from_ndarray(px, format="rgb24")):
                        out.mux(packet)
                for packet in stream.encode():
                    out.mux(packet)
        return root


def frame_number(img: np.ndarray) -> int:
    """Decode the synthetic frame-number strip (8 blocks along the top) of a frame of any size."""
    side = img.shape[1]
    g = img.astype(np.float32).mean(-1)
    bw = side / 8
    bits = [g[int(bw / 2), int((b + 0.5) * bw)] > 127 for b in range(8)]
    return sum(1 << b for b, on in enumerate(bits) if on)


def video_wise_metrics(Y: np.ndarray, scores: np.ndarray, videos: Sequence[str]) -> dict[str, float]:
    """The phase-recognition literature's averaging (TeCNO, Trans-SVNet, AutoLaparo's benchmark):
    per video, accuracy over its frames and precision / recall / Jaccard averaged over the phases
    present in its ground truth; then the mean over videos. Predictions = argmax of the scores."""
    from sklearn.metrics import jaccard_score, precision_recall_fscore_support

    y, pred, vids = Y.argmax(1), scores.argmax(1), np.asarray(videos)
    per: list[list[float]] = []
    for v in np.unique(vids):
        m = vids == v
        present = np.unique(y[m])
        p, r, _, _ = precision_recall_fscore_support(y[m], pred[m], labels=present, average="macro", zero_division=0)
        j = jaccard_score(y[m], pred[m], labels=present, average="macro", zero_division=0)
        per.append([float((y[m] == pred[m]).mean()), float(p), float(r), float(j)])
    mean = np.mean(per, axis=0) if per else [float("nan")] * 4
    return dict(zip(("video_acc", "video_precision", "video_recall", "video_jaccard"), map(float, mean), strict=True))


AutoLaparo.grouped_metrics = staticmethod(video_wise_metrics)  # cells add these per eval split
