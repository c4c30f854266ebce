"""EndoVis 2018 Robotic Scene Segmentation (Allan et al., arXiv 2001.11190): 1280x1024 frames of
robotic nephrectomies, colour-coded scene labels, 2D segmentation (task multiclass).

Official layout (the challenge's training releases, unzipped side by side under the root):

    root/miccai_challenge_2018_release_1/seq_{1..4}/
    root/miccai_challenge_release_{2,3,4}/seq_N/
        left_frames/frameNNN.png     1280x1024 RGB (right_frames/ and calibration are ignored)
        labels/frameNNN.png          RGB, one colour per scene class
        labels.json                  [{"name", "color": [r, g, b], "classid"}, ...]
    (__MACOSX/ folders from the zips, and any `._*` files, are ignored)

Verified (public loaders of this release): the four release folder names, `seq_N/left_frames` and
`seq_N/labels` with matching `frameNNN.png` names, and the 12 classes with their colours (in
CLASS_COLORS below). From memory, not verified: that `labels.json` sits in every sequence folder
(it is looked up in the sequence folder, then the release folder, then the root), and which
sequences ship in which release (synth writes 1-4 / 5-7 / 9-12 / 13-16; the reader takes any
`seq_N` under any release folder).

Classes: label value k = CLASSES[k - 1]; 0 is "background-tissue". labels.json is read for the
colour of each class, matched by name (so a release that numbers classes differently still maps to
this order); a label colour not in labels.json is an error naming the file and the colours.

Split (ISINet, Gonzalez et al., MICCAI 2020, which the paper follows): test = sequences 2, 5, 9 and
15; train = the other 11; val = round(val_fraction x 11) training sequences drawn by the dataset's
split seed (`carve_val`, default 10%: one sequence, seed 0). patient_id = the sequence.

Metrics (Table 7 of the paper): per scene class Dice and IoU, their means, and `iou_instrument`:
binary IoU of instrument vs rest, where instrument = the union of instrument-shaft,
instrument-clasper, instrument-wrist (the parts of every robotic tool), suction-instrument and
ultrasound-probe: the seven ISINet instrument types (bipolar / prograsp forceps, large needle
driver, monopolar curved scissors, clip applier, suction instrument, ultrasound probe) are all of
these. Clamps (clips left in tissue), thread and needles are not instruments.
Instrument-type IoU (ISINet's instrument-type annotations, `seq_N/instrument_labels_2017/`) is the
dataset `endovis18_types` (tasks/datasets/endovis18_types.py): the same frames and split, the
instrument types as target and classes.
"""

from __future__ import annotations

import json
import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd

from tasks.datasets.base import (
    ImageDataset,
    Problem,
    Report,
    carve_val,
    file_sha256,
    fresh_root,
    make_index,
    read_raster,
    register_dataset,
)
from tasks.datasets.dense_base import DenseDataset, check_sample
from tasks.dense import Sample
from tasks.errors import DatasetError

RELEASES = ("miccai_challenge_2018_release_1", "miccai_challenge_release_2", "miccai_challenge_release_3",
            "miccai_challenge_release_4")
CLASS_COLORS: dict[str, tuple[int, int, int]] = {
    "background-tissue": (0, 0, 0), "instrument-shaft": (0, 255, 0), "instrument-clasper": (0, 255, 255),
    "instrument-wrist": (125, 255, 12), "kidney-parenchyma": (255, 55, 0), "covered-kidney": (24, 55, 125),
    "thread": (187, 155, 25), "clamps": (0, 255, 125), "suturing-needle": (255, 255, 125),
    "suction-instrument": (123, 15, 175), "small-intestine": (124, 155, 5), "ultrasound-probe": (12, 255, 141),
}
NAMES = tuple(CLASS_COLORS)  # label value = position (0 = background-tissue)
CLASSES = NAMES[1:]
ALIASES = {"background": "background-tissue", "small-intestines": "small-intestine",
           "small intestines": "small-intestine"}
INSTRUMENT = ("instrument-shaft", "instrument-clasper", "instrument-wrist", "suction-instrument", "ultrasound-probe")
TEST_SEQUENCES = (2, 5, 9, 15)
SYNTH_RELEASES = {1: (1, 2, 3, 4), 2: (5, 6, 7), 3: (9, 10, 11, 12), 4: (13, 14, 15, 16)}
_SEQ = re.compile(r"^seq_(\d+)$")
_FRAME = re.compile(r"^frame(\d+)\.png$")
_PRESENCE: dict[tuple[str, int, int], list[int]] = {}  # label file (path, size, mtime) -> class presence


def _colour_code(rgb: np.ndarray) -> np.ndarray:
    rgb = rgb.astype(np.int64)
    return (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]


@register_dataset
class EndoVis18(DenseDataset):
    """EndoVis 2018 scene segmentation, 11 classes + background, ISINet's sequence split."""

    name = "endovis18"
    task = "multiclass"
    target_kind = "mask2d"
    classes = CLASSES
    image_suffix = ".png"

    # -- layout -------------------------------------------------------------------------------------
    def _sequences(self) -> list[tuple[int, Path]]:
        out = []
        for rel in RELEASES:
            d = self.root / rel
            if not d.is_dir():
                continue
            for s in sorted(d.iterdir()):
                m = _SEQ.match(s.name)
                if m and s.is_dir():
                    out.append((int(m.group(1)), s))
        return sorted(out)

    def _image_dirs(self) -> list[Path]:
        dirs = []
        for _, s in self._sequences():
            dirs += [d for d in (s / "left_frames", s / "labels") if d.is_dir()]
        return dirs

    def _labels_json(self, seq_dir: Path) -> Path | None:
        for d in (seq_dir, seq_dir.parent, self.root):
            if (d / "labels.json").is_file():
                return d / "labels.json"
        return None

    def fingerprint(self) -> str:
        if self._fingerprint is None:
            import hashlib

            h = hashlib.sha256(super().fingerprint().encode())
            for p in sorted({self._labels_json(s) for _, s in self._sequences()} - {None}):
                h.update(f"\n{p.relative_to(self.root).as_posix()} {file_sha256(p)}".encode())
            self._fingerprint = h.hexdigest()
        return self._fingerprint

    def colour_map(self, seq_dir: Path) -> dict[int, int]:
        """labels.json of a sequence -> {24-bit colour: label value}; DatasetError names the file."""
        p = self._labels_json(seq_dir)
        if p is None:
            raise DatasetError(str(seq_dir / "labels.json"), "missing labels.json (class names and colours)")
        try:
            entries = json.loads(p.read_text())
            out = {}
            for e in entries:
                name = ALIASES.get(str(e["name"]).strip(), str(e["name"]).strip())
                if name not in CLASS_COLORS:
                    raise DatasetError(str(p), f"unknown class {e['name']!r}; expected one of {', '.join(NAMES)}")
                r, g, b = (int(v) for v in e["color"][:3])
                out[(r << 16) | (g << 8) | b] = NAMES.index(name)
        except DatasetError:
            raise
        except (ValueError, KeyError, TypeError) as e:
            raise DatasetError(str(p), f"cannot parse labels.json (a list of name/color/classid): {e}") from e
        return out

    def _distinct_sequences(self, report: Report) -> list[tuple[int, Path]]:
        """(number, folder) of each sequence once; a sequence found in two releases is reported."""
        seqs = self._sequences()
        if not seqs:
            report.add(self.root, f"no seq_N folders under any of {', '.join(RELEASES)}")
        seen: dict[int, Path] = {}
        for n, s in seqs:
            if n in seen:
                report.add(s, f"sequence {n} is also in {seen[n]}")
            else:
                seen[n] = s
        return list(seen.items())

    def _load(self, report: Report) -> pd.DataFrame | None:
        rows = []
        for n, s in self._distinct_sequences(report):
            if self._labels_json(s) is None:
                report.add(s / "labels.json", "missing labels.json (class names and colours)")
            frames, labels = s / "left_frames", s / "labels"
            if not frames.is_dir():
                report.add(frames, "missing left_frames folder")
                continue
            names = sorted(f for f in os.listdir(frames) if _FRAME.match(f) and not f.startswith("._"))
            have = set(os.listdir(labels)) if labels.is_dir() else set()
            for f in names:
                if f not in have:
                    report.add(frames / f, f"frame has no label ({labels / f} is missing)")
                    continue
                rows.append((n, s, f))
        if not rows:
            return None
        val = carve_val([str(n) for n, _, _ in rows if n not in TEST_SEQUENCES], self.val_fraction, self.seed)
        split = ["test" if n in TEST_SEQUENCES else "val" if str(n) in val else "train" for n, _, _ in rows]
        targets = self._presence([s / "labels" / f for _, s, f in rows], [s for _, s, _ in rows], report)
        return make_index([f"seq_{n}/{f[:-4]}" for n, _, f in rows], [str(s / "left_frames" / f) for _, s, f in rows],
                          split, [f"seq_{n}" for n, _, _ in rows], targets)

    def _presence(self, label_paths: list[Path], seq_dirs: list[Path], report: Report) -> list[list[int]]:
        """Class presence of each frame (the index's target), read from its label PNG once per
        process (memoised by file path, size and mtime). A label that cannot be read gets an
        empty presence here; reading its sample names the problem (the bad file fails alone)."""
        maps: dict[Path, dict[int, int] | None] = {}

        def one(i: int) -> list[int]:
            p = label_paths[i]
            try:
                st = p.stat()
                key = (str(p), st.st_size, st.st_mtime_ns)
                if key not in _PRESENCE:
                    cmap = maps.get(seq_dirs[i])
                    if cmap is None:
                        return [0] * len(CLASSES)
                    codes = np.unique(_colour_code(read_raster(p, "RGB")))
                    present = {cmap[c] for c in codes if c in cmap}
                    _PRESENCE[key] = [int(k in present) for k in range(1, len(NAMES))]
                return _PRESENCE[key]
            except (OSError, DatasetError):
                return [0] * len(CLASSES)

        for s in set(seq_dirs):
            try:
                maps[s] = self.colour_map(s)
            except DatasetError as e:
                if self._labels_json(s) is not None:  # a missing one was reported in _load
                    report.add(e.path, e.problem)
                maps[s] = None
        from tqdm.auto import tqdm

        with ThreadPoolExecutor(max(1, min(8, os.cpu_count() or 1))) as pool:
            return list(tqdm(pool.map(one, range(len(label_paths))), total=len(label_paths),
                             desc=f"{self.name} class presence", unit="label", leave=False))

    # -- samples ------------------------------------------------------------------------------------
    def read_sample(self, case_id: str) -> Sample:
        # The frame's path follows from its id (seq_N/frameNNN): no index() needed, so a worker
        # reading a few frames does not first read every label for the index's class presence.
        m = re.match(r"^seq_(\d+)/(frame\d+)$", case_id)
        seq = dict(self._sequences()).get(int(m.group(1))) if m else None
        if seq is None or not (seq / "left_frames" / f"{m.group(2)}.png").is_file():
            return self._sample(case_id, Path(self.row(case_id)["path"]))  # KeyError names an unknown case
        return self._sample(case_id, seq / "left_frames" / f"{m.group(2)}.png")

    def _check_image(self, path: str, decode: bool) -> Problem | None:
        """Decode the frame and its label by path (not through index(), which a frame without a
        label makes refuse the dataset), so check() names every bad file, each on its own."""
        problem = ImageDataset._check_image(self, path, decode=False)
        if problem is not None or not decode:
            return problem
        p = Path(path)
        try:
            check_sample(self._sample(f"{p.parent.parent.name}/{p.stem}", p), self.target_kind)
        except DatasetError as e:
            return Problem(e.path, e.problem)
        return None

    def _sample(self, case_id: str, img_path: Path) -> Sample:
        seq_dir = img_path.parent.parent
        label_path = seq_dir / "labels" / img_path.name
        img = read_raster(img_path, "RGB")
        lab = read_raster(label_path, "RGB")
        if lab.shape[:2] != img.shape[:2]:
            raise DatasetError(str(label_path), f"mask size {lab.shape[1]}x{lab.shape[0]} does not match image size "
                                                f"{img.shape[1]}x{img.shape[0]} (W x H)")
        cmap = self.colour_map(seq_dir)
        codes = _colour_code(lab)
        # colour -> label by binary search in the few known colours (np.unique over 1.3M pixels
        # would sort them all)
        keys = np.array(sorted(cmap), dtype=np.int64)
        pos = np.searchsorted(keys, codes).clip(0, len(keys) - 1)
        known = keys[pos] == codes
        if not known.all():
            unknown = np.unique(codes[~known])
            cols = ", ".join(str((int(u) >> 16 & 255, int(u) >> 8 & 255, int(u) & 255)) for u in unknown[:8])
            raise DatasetError(str(label_path), f"label colour(s) {cols} are not in {self._labels_json(seq_dir)}")
        target = np.array([cmap[int(k)] for k in keys], dtype=np.int64)[pos]
        return Sample(case_id=case_id, images=img[None, None], target=target,
                      meta={"path": str(img_path), "label_path": str(label_path), "stem": img_path.stem,
                            "pred_dir": seq_dir.name, "classes": list(CLASSES),
                            "groups": {"instrument": [NAMES.index(c) for c in INSTRUMENT]},
                            "colors": {k: CLASS_COLORS[n] for k, n in enumerate(NAMES)}})

    # -- synthetic data -----------------------------------------------------------------------------
    @classmethod
    def synth(cls, root: str | os.PathLike, n: int = 150, seed: int = 0, image_size: int = 160) -> Path:
        """n frames over the 15 sequences (1-7, 9-16), image_size wide, 5:4 like the real
        1280x1024 frames. Each frame: textured tissue, a kidney blob, and two grey instruments of
        identical shafts: a robotic one (instrument-shaft, with a bright clasper at its tip) and a
        suction instrument (plain tip). Far from the tip the two shafts look the same in any one
        16-px patch: telling them apart needs the context of the tip a few patches away."""
        root = fresh_root(root)
        rng = np.random.default_rng(seed)
        w = int(image_size)
        h = max(16, int(round(w * 4 / 5)))
        seqs = [s for r in SYNTH_RELEASES.values() for s in r]
        per = [n // len(seqs) + (1 if i < n % len(seqs) else 0) for i in range(len(seqs))]
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        label_json = [{"name": k, "color": list(c), "classid": i} for i, (k, c) in enumerate(CLASS_COLORS.items())]
        (root / "__MACOSX").mkdir()  # zip junk the reader must ignore
        (root / "__MACOSX" / "._labels.json").write_bytes(b"\x00\x05junk")
        for rel_i, rel_seqs in SYNTH_RELEASES.items():
            rel = root / RELEASES[rel_i - 1]
            for s in rel_seqs:
                sd = rel / f"seq_{s}"
                (sd / "left_frames").mkdir(parents=True)
                (sd / "labels").mkdir()
                (sd / "labels.json").write_text(json.dumps(label_json, indent=1))
                for f in range(per[seqs.index(s)]):
                    cls._write_synth_frame(rng, sd, f"frame{f:03d}", yy, xx)
        return root

    @classmethod
    def _write_synth_frame(cls, rng: np.random.Generator, seq_dir: Path, stem: str, yy: np.ndarray,
                           xx: np.ndarray) -> None:
        """One synthetic frame and its scene label (subclasses add their own annotations)."""
        img, lab = _synth_frame(rng, *yy.shape, yy, xx)
        save_png(img, seq_dir / "left_frames" / f"{stem}.png")
        save_png(scene_colours(lab), seq_dir / "labels" / f"{stem}.png")


def save_png(arr: np.ndarray, path: Path) -> None:
    from PIL import Image

    Image.fromarray(arr).save(path, compress_level=1)


def scene_colours(lab: np.ndarray) -> np.ndarray:
    """A scene label map (values = positions in NAMES) as the release's colour-coded RGB label."""
    return np.array([CLASS_COLORS[n] for n in NAMES], dtype=np.uint8)[lab]


def _bar(yy: np.ndarray, xx: np.ndarray, p0: np.ndarray, p1: np.ndarray, half_width: float) -> tuple[np.ndarray, np.ndarray]:
    """Pixels within half_width of the segment p0-p1, and their position t in [0, 1] along it."""
    d = p1 - p0
    t = np.clip(((xx - p0[0]) * d[0] + (yy - p0[1]) * d[1]) / float(d @ d), 0.0, 1.0)
    dist = np.hypot(xx - (p0[0] + t * d[0]), yy - (p0[1] + t * d[1]))
    return dist <= half_width, t


def synth_tissue(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A synthetic frame's background: (float RGB image, scene label map) of textured tissue and a
    kidney, a reddish ellipse (local appearance suffices); the instruments are drawn on top."""
    h, w = yy.shape
    s = w / 160.0  # sizes scale with the frame
    img = np.empty((h, w, 3), dtype=np.float32)
    img[:] = (150, 70, 60)
    img += 12 * rng.standard_normal((h, w, 1)) + 6 * rng.standard_normal((h, w, 3))
    lab = np.zeros((h, w), dtype=np.int64)
    cy, cx = rng.uniform(0.3, 0.7) * h, rng.uniform(0.25, 0.75) * w
    ry, rx = rng.uniform(14, 24) * s, rng.uniform(18, 30) * s
    kid = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
    img[kid] = (200, 40, 30) + 8 * rng.standard_normal((int(kid.sum()), 3))
    lab[kid] = NAMES.index("kidney-parenchyma")
    return img, lab


def _synth_frame(rng: np.random.Generator, h: int, w: int, yy: np.ndarray, xx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    s = w / 160.0
    img, lab = synth_tissue(rng, yy, xx)
    # two instruments entering from the left and right borders, shafts alike, tips differ
    for side, kind in zip(rng.permutation(2), ("robotic", "suction"), strict=True):
        x0 = -4.0 * s if side == 0 else w + 4.0 * s
        p0 = np.array([x0, rng.uniform(0.2, 0.8) * h])
        length = rng.uniform(45, 60) * s
        ang = rng.uniform(-0.5, 0.5) + (0 if side == 0 else np.pi)
        p1 = p0 + length * np.array([np.cos(ang), np.sin(ang)])
        shaft, t = _bar(yy, xx, p0, p1, 4.5 * s)
        img[shaft] = (175, 175, 180) + 5 * rng.standard_normal((int(shaft.sum()), 3))
        lab[shaft] = NAMES.index("instrument-shaft" if kind == "robotic" else "suction-instrument")
        if kind == "robotic":  # a bright yellow-white clasper past the tip
            tip, _ = _bar(yy, xx, p1, p1 + 7 * s * np.array([np.cos(ang), np.sin(ang)]), 5.5 * s)
            tip &= ~shaft | (t > 0.999)
            img[tip] = (250, 240, 120) + 5 * rng.standard_normal((int(tip.sum()), 3))
            lab[tip] = NAMES.index("instrument-clasper")
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), lab
