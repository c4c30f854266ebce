"""EndoVis 2018 instrument types (`endovis18_types`): the EndoVis18 frames with ISINet's
instrument-type annotations (Gonzalez et al., "ISINet: an instance-based approach for surgical
instrument segmentation", MICCAI 2020, arXiv 2007.05533) as the target: 7 instrument types +
background, 2D segmentation (task multiclass), ISINet's sequence split (as `endovis18`).

Layout: the EndoVis18 release layout (see tasks/datasets/endovis18.py) as ISINet's download keeps
it, plus one folder per sequence:

    root/<release>/seq_N/left_frames/frameNNN.png
    root/<release>/seq_N/instrument_labels_2017/<frame>_class<C>_inst<K>.png   one per instrument
        instance: a binary mask (0/255 or 0/1 grey, or RGB where any channel > 0 is the instance)

(`labels/`, `labels.json` may be there too: the scene labels are not read here.) A frame without
instance files has no instrument (all background). A sequence without `instrument_labels_2017/` is
an error naming the folder (`medscale datasets check` lists every one; a sweep's pre-flight check
refuses it).

Verified (ISINet's own data scripts, data/organize2018.py and temp_consistency_module/datasets.py
of BCV-Uniandes/ISINet): the folder name, the file naming with the class id in the name, the mask
encodings above, and how a label map is made: instances painted onto background 0 with their class
id. ISINet paints in directory-listing order; here in file-name order, so overlaps are deterministic.
The mask rule follows ISINet's: RGB -> any channel > 0; grey with maximum 255 -> pixels at 255;
other grey -> pixels > 0.

Class ids: the numbering of ISINet's "labels 2017" (its robotseg_to_coco.py categories, EndoVis
2017's seven types extended by two): 1 bipolar forceps, 2 prograsp forceps, 3 large needle driver,
4 vessel sealer, 5 grasping retractor, 6 monopolar curved scissors, 7 ultrasound probe (EndoVis
2017's "other"), 8 suction instrument, 9 clip applier. ISINet's 2018 types are the seven of these
without 4 and 5 (its 9-class evaluation zeroes those two on 2018); label values here are those
seven in that order (ISINet's own 2018 renumbering): 1 bipolar-forceps, 2 prograsp-forceps,
3 large-needle-driver, 4 monopolar-curved-scissors, 5 ultrasound-probe, 6 suction-instrument,
7 clip-applier. NOT verified (no download at hand): that the files of `instrument_labels_2017/`
use this 9-id numbering rather than the 2018 renumbering 1-7. A file with id 4 or 5 (or > 9) is an
error naming it, so a download numbered the other way fails loudly (every real 2018 sequence has
monopolar curved scissors, id 4 in the other numbering) instead of being read with wrong names.

Metrics (ISINet's, computed by tasks/targets/mask2d.py as for the scene classes): per type
`iou_<type>` = mean over cases of the case's IoU, over the cases where the type is in the ground
truth or the prediction (ISINet's per-class IoU), `miou` = mean over the types that have such a
case (ISINet's "mean class IoU"; a type absent from every case and never predicted is left out,
not counted as 0), Dice likewise, `iou_instrument`: binary IoU of any instrument vs background,
and `iou_challenge`: ISINet's "challenge IoU" (per frame the mean IoU over the types in its ground
truth, then the mean over frames with any instrument), the measure of the "Instrument IoU" column
of the paper's Table 7 for the methods it cites (the paper describes its EndoVis18 task as these
seven instrument categories).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pandas as pd

from tasks.datasets.base import (
    ImageDataset,
    Problem,
    Report,
    carve_val,
    make_index,
    read_raster,
    register_dataset,
)
from tasks.datasets.endovis18 import (
    _FRAME,
    NAMES,
    TEST_SEQUENCES,
    EndoVis18,
    _bar,
    save_png,
    scene_colours,
    synth_tissue,
)
from tasks.dense import Sample
from tasks.errors import DatasetError

INSTANCE_DIR = "instrument_labels_2017"
# ISINet's 2018 types: (name, class id in the file names); label value = position + 1
TYPE_IDS: dict[str, int] = {
    "bipolar-forceps": 1, "prograsp-forceps": 2, "large-needle-driver": 3, "monopolar-curved-scissors": 6,
    "ultrasound-probe": 7, "suction-instrument": 8, "clip-applier": 9,
}
TYPES = tuple(TYPE_IDS)
VALUE_OF_ID = {cid: k + 1 for k, cid in enumerate(TYPE_IDS.values())}
NOT_IN_2018 = {4: "vessel sealer", 5: "grasping retractor"}  # EndoVis 2017 types ISINet's 2018 lacks
# Display colours of the predicted-mask PNGs (ours; the annotations have none). synth paints each
# type's instrument in its colour, so a per-patch probe can tell the types apart.
TYPE_COLORS: dict[str, tuple[int, int, int]] = {
    "bipolar-forceps": (60, 90, 230), "prograsp-forceps": (40, 200, 80), "large-needle-driver": (235, 235, 235),
    "monopolar-curved-scissors": (25, 25, 30), "ultrasound-probe": (230, 200, 40),
    "suction-instrument": (170, 60, 200), "clip-applier": (40, 210, 220),
}
_INSTANCE = re.compile(r"^(frame\d+)_class(\d+)_inst(\d+)\.png$")


def read_instance_mask(path: Path) -> np.ndarray:
    """One instance file -> bool (H, W), by ISINet's rule (module doc); DatasetError names the file."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in ("1", "L", "I", "I;16", "I;16B", "I;16L"):
                a = np.asarray(im)
                if a.dtype == bool:
                    return a.copy()
                return a == 255 if a.max(initial=0) == 255 and a.dtype == np.uint8 else a > 0
            return np.asarray(im.convert("RGB")).max(axis=2) > 0
    except FileNotFoundError:
        raise DatasetError(str(path), "instance mask is missing") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DatasetError(str(path), f"cannot decode instance mask: {e}") from e


@register_dataset
class EndoVis18Types(EndoVis18):
    """EndoVis 2018 frames, ISINet's 7 instrument types + background, ISINet's sequence split."""

    name = "endovis18_types"
    classes = TYPES

    def __init__(self, root: str | os.PathLike, val_fraction: float = 0.1, seed: int = 0):
        super().__init__(root, val_fraction, seed)
        self._listing: dict[Path, dict[str, list[tuple[str, int]]]] = {}

    # -- layout -------------------------------------------------------------------------------------
    def _image_dirs(self) -> list[Path]:
        dirs = []
        for _, s in self._sequences():
            dirs += [d for d in (s / "left_frames", s / INSTANCE_DIR) if d.is_dir()]
        return dirs

    def fingerprint(self) -> str:
        # frames and instance masks (listing with sizes) and the split; labels.json is not read here
        return ImageDataset.fingerprint(self)

    def layout_problems(self) -> list[Problem]:
        """The fast pre-sweep check: every sequence has its instance-mask folder (nothing read)."""
        return super().layout_problems() or [Problem(str(s / INSTANCE_DIR), _missing_dir())
                                             for _, s in self._sequences() if not (s / INSTANCE_DIR).is_dir()]

    def instances(self, seq_dir: Path) -> dict[str, list[tuple[str, int]]]:
        """Frame stem -> [(instance file name, class id)] in file-name order (listed once)."""
        if seq_dir not in self._listing:
            d = seq_dir / INSTANCE_DIR
            if not d.is_dir():
                raise DatasetError(str(d), _missing_dir())
            out: dict[str, list[tuple[str, int]]] = {}
            for f in sorted(os.listdir(d)):
                m = _INSTANCE.match(f)
                if m:
                    out.setdefault(m.group(1), []).append((f, int(m.group(2))))
            self._listing[seq_dir] = out
        return self._listing[seq_dir]

    def _load(self, report: Report) -> pd.DataFrame | None:
        rows = []
        for n, s in self._distinct_sequences(report):
            frames, inst = s / "left_frames", s / INSTANCE_DIR
            if not frames.is_dir():
                report.add(frames, "missing left_frames folder")
                continue
            if not inst.is_dir():
                report.add(inst, _missing_dir())
                continue
            names = sorted(f for f in os.listdir(frames) if _FRAME.match(f) and not f.startswith("._"))
            listing = self.instances(s)
            if report.collect:  # stray files: named by check(), never a reason to refuse the index
                stems = {f[:-4] for f in names}
                for stem in sorted(set(listing) - stems):
                    report.add(inst / listing[stem][0][0], f"instance mask of a frame not in {frames}")
                for f in sorted(os.listdir(inst)):
                    if f.endswith(".png") and not f.startswith("._") and not _INSTANCE.match(f):
                        report.add(inst / f, "not named <frame>_class<C>_inst<K>.png (ISINet's naming)")
            rows += [(n, s, f, [VALUE_OF_ID.get(c) for _, c in listing.get(f[:-4], [])]) for f in names]
        if not rows:
            return None
        val = carve_val([str(n) for n, *_ in rows if n not in TEST_SEQUENCES], self.val_fraction, self.seed)
        split = ["test" if n in TEST_SEQUENCES else "val" if str(n) in val else "train" for n, *_ in rows]
        # class presence from the file names (no mask read); a file of an unknown id fails its frame
        targets = [[int(k in vals) for k in range(1, len(TYPES) + 1)] for *_, vals in rows]
        return make_index([f"seq_{n}/{f[:-4]}" for n, _, f, _ in rows],
                          [str(s / "left_frames" / f) for _, s, f, _ in rows], split,
                          [f"seq_{n}" for n, *_ in rows], targets)

    # -- samples ------------------------------------------------------------------------------------
    def _sample(self, case_id: str, img_path: Path) -> Sample:
        seq_dir = img_path.parent.parent
        img = read_raster(img_path, "RGB")
        target = np.zeros(img.shape[:2], dtype=np.int64)
        files = self.instances(seq_dir).get(img_path.stem, [])
        for f, cid in files:  # painted in file-name order: a later instance wins where two overlap
            path = seq_dir / INSTANCE_DIR / f
            if cid not in VALUE_OF_ID:
                why = (f"is EndoVis 2017's {NOT_IN_2018[cid]}, not one of ISINet's 2018 types" if cid in NOT_IN_2018
                       else "is not an instrument-type id")
                raise DatasetError(str(path), f"class id {cid} {why} (expected {sorted(VALUE_OF_ID)}: "
                                              f"{', '.join(TYPES)}); see the numbering in {__name__}")
            mask = read_instance_mask(path)
            if mask.shape != target.shape:
                raise DatasetError(str(path), f"mask size {mask.shape[1]}x{mask.shape[0]} does not match the "
                                              f"frame's {img.shape[1]}x{img.shape[0]} (W x H)")
            target[mask] = VALUE_OF_ID[cid]
        label_path = seq_dir / INSTANCE_DIR / (files[0][0] if files else f"{img_path.stem}_class<C>_inst<K>.png")
        return Sample(case_id=case_id, images=img[None, None], target=target,
                      meta={"path": str(img_path), "label_path": str(label_path), "stem": img_path.stem,
                            "pred_dir": seq_dir.name, "classes": list(TYPES),
                            "instance_files": [f for f, _ in files],
                            "groups": {"instrument": list(range(1, len(TYPES) + 1))},
                            "colors": {0: (0, 0, 0), **{k + 1: TYPE_COLORS[t] for k, t in enumerate(TYPES)}}})

    # -- synthetic data -----------------------------------------------------------------------------
    @classmethod
    def synth(cls, root: str | os.PathLike, n: int = 150, seed: int = 0, image_size: int = 160) -> Path:
        """The EndoVis18 layout (frames, scene labels, labels.json) plus ISINet's
        `instrument_labels_2017/` in its naming: n frames over the 15 sequences, each with tissue,
        a kidney and two instruments of different types entering from the borders, each type in its
        own colour (TYPE_COLORS) so the type is visible within a patch; one 0/255 mask per instance."""
        return super().synth(root, n=n, seed=seed, image_size=image_size)

    @classmethod
    def _write_synth_frame(cls, rng: np.random.Generator, seq_dir: Path, stem: str, yy: np.ndarray,
                           xx: np.ndarray) -> None:
        (seq_dir / INSTANCE_DIR).mkdir(exist_ok=True)
        img, scene, owner, types = _synth_types_frame(rng, yy, xx)
        save_png(img, seq_dir / "left_frames" / f"{stem}.png")
        save_png(scene_colours(scene), seq_dir / "labels" / f"{stem}.png")
        count: dict[int, int] = {}
        for i, t in enumerate(types):
            cid = TYPE_IDS[t]
            k = count[cid] = count.get(cid, -1) + 1
            save_png(np.where(owner == i, 255, 0).astype(np.uint8), seq_dir / INSTANCE_DIR / f"{stem}_class{cid}_inst{k}.png")


def _missing_dir() -> str:
    return (f"missing {INSTANCE_DIR} folder (ISINet's instrument-type annotations, one "
            "<frame>_class<C>_inst<K>.png per instrument)")


def _synth_types_frame(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """(image, scene label map, instance owner map (-1 none), instance types)."""
    h, w = yy.shape
    s = w / 160.0
    img, scene = synth_tissue(rng, yy, xx)
    owner = np.full((h, w), -1, dtype=np.int64)
    types = [TYPES[int(i)] for i in rng.choice(len(TYPES), size=2, replace=False)]
    for i, (side, t) in enumerate(zip(rng.permutation(2), types, strict=True)):
        p0 = np.array([-4.0 * s if side == 0 else w + 4.0 * s, rng.uniform(0.2, 0.8) * h])
        ang = rng.uniform(-0.5, 0.5) + (0 if side == 0 else np.pi)
        p1 = p0 + rng.uniform(55, 75) * s * np.array([np.cos(ang), np.sin(ang)])
        bar, _ = _bar(yy, xx, p0, p1, 10.0 * s)  # thick: a type must fill part of a 16-px patch
        img[bar] = TYPE_COLORS[t] + 6 * rng.standard_normal((int(bar.sum()), 3))
        scene[bar] = NAMES.index(t if t in ("suction-instrument", "ultrasound-probe") else "instrument-shaft")
        owner[bar] = i  # a later instrument covers an earlier one: its mask owns the overlap
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), scene, owner, types
