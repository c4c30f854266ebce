"""RSNA Pneumonia Detection Challenge (stage 2 train set), binary pneumonia, MGCA's split.

Official layout (the Kaggle download) plus the split files MGCA's `preprocess/rsna.py` writes
next to it (70/15/15 of patients, sklearn `train_test_split(random_state=0)`):

    root/stage_2_train_labels.csv          patientId,x,y,width,height,Target (one row per box;
                                           negatives have one row with empty x/y/width/height)
    root/stage_2_detailed_class_info.csv   patientId,class (optional here: read only if present)
    root/stage_2_train_images/<patientId>.dcm
    root/train.csv, root/val.csv, root/test.csv   patientId,bbox,Target (MGCA)

One film per patient, so patient_id = case_id = patientId. The target comes from
stage_2_train_labels.csv; MGCA's files decide the split (val_fraction and seed do not apply: the
split ships its own validation set).
"""

from __future__ import annotations

import hashlib
import io
import os
import uuid
from pathlib import Path

import numpy as np
import pandas as pd

import tasks.datasets.synthetic as syn
from tasks.datasets.base import ImageDataset, LayoutFile, Report, fresh_root, make_index, register_dataset

LABELS, CLASSINFO, IMAGES = "stage_2_train_labels.csv", "stage_2_detailed_class_info.csv", "stage_2_train_images"
SPLIT_FILES = {"train": "train.csv", "val": "val.csv", "test": "test.csv"}
CLASS_NAMES = ("Lung Opacity", "No Lung Opacity / Not Normal", "Normal")
PREVALENCE = 0.3  # real stage 2: 31.6% of patients


@register_dataset
class RSNAPneumonia(ImageDataset):
    """RSNA Pneumonia, binary (Pneumonia), MGCA's patient split."""

    name = "rsna_pneumonia"
    task = "binary"
    classes = ("Pneumonia",)
    files = (
        LayoutFile(LABELS, "label CSV stage_2_train_labels.csv (from the Kaggle RSNA download)"),
        LayoutFile(CLASSINFO, "class CSV stage_2_detailed_class_info.csv", required=False),
        *(LayoutFile(f, f"MGCA split file {f} (made by MGCA's mgca/preprocess/rsna.py)", split=True)
          for f in SPLIT_FILES.values()),
    )
    image_suffix = ".dcm"
    carves_val = False

    def _image_dirs(self) -> list[Path]:
        d = self.root / IMAGES
        return [d] if d.is_dir() else []

    def _read_targets(self, report: Report) -> dict[str, int] | None:
        df = self._read_csv(LABELS, ["patientId", "x", "y", "width", "height", "Target"], report)
        if df is None:
            return None
        path = self.root / LABELS
        out: dict[str, int] = {}
        for line, row in enumerate(df.itertuples(index=False), 2):
            pid, t = row.patientId.strip(), row.Target.strip()
            box = [row.x, row.y, row.width, row.height]
            if not pid or t not in ("0", "1"):
                report.add(path, f"line {line}: malformed row (patientId {pid!r}, Target {t!r})")
                continue
            has_box = [bool(v.strip()) for v in box]  # positives carry a box, negatives none
            if (t == "1" and not all(has_box)) or (t == "0" and any(has_box)):
                report.add(path, f"line {line}: {pid}: Target {t} with box {box}")
                continue
            if pid in out and out[pid] != int(t):
                report.add(path, f"line {line}: {pid} has rows with Target 0 and 1")
                continue
            out[pid] = int(t)
        return out

    def _check_classinfo(self, targets: dict[str, int], report: Report) -> None:
        if not (self.root / CLASSINFO).is_file():
            return
        df = self._read_csv(CLASSINFO, ["patientId", "class"], report)
        if df is None:
            return
        for line, (pid, cls) in enumerate(zip(df["patientId"], df["class"], strict=True), 2):
            if cls not in CLASS_NAMES:
                report.add(self.root / CLASSINFO, f"line {line}: {pid}: unknown class {cls!r}")
            elif pid in targets and (cls == CLASS_NAMES[0]) != bool(targets[pid]):
                report.add(self.root / CLASSINFO, f"line {line}: {pid}: class {cls!r} disagrees "
                                                  f"with Target {targets[pid]} in {LABELS}")

    def _load(self, report: Report) -> pd.DataFrame | None:
        targets = self._read_targets(report)
        splits = {s: self._read_csv(f, ["patientId", "Target"], report) for s, f in SPLIT_FILES.items()}
        if targets is None or any(df is None for df in splits.values()):
            return None
        if report.collect:
            self._check_classinfo(targets, report)
        split_of: dict[str, str] = {}
        for split, df in splits.items():
            path = self.root / SPLIT_FILES[split]
            for line, (pid, t) in enumerate(zip(df["patientId"], df["Target"], strict=True), 2):
                pid = pid.strip()
                if pid not in targets:
                    report.add(path, f"line {line}: {pid!r} is not in {LABELS}")
                elif pid in split_of:
                    report.add(path, f"line {line}: {pid} is also in {SPLIT_FILES[split_of[pid]]}")
                else:
                    if t.strip() != str(targets[pid]):
                        report.add(path, f"line {line}: {pid}: Target {t} disagrees with {LABELS}")
                    split_of[pid] = split
        ids = sorted(split_of)
        return make_index(ids, [str(self.root / IMAGES / f"{p}.dcm") for p in ids], [split_of[p] for p in ids],
                          ids, [[targets[p]] for p in ids])

    @classmethod
    def synth(cls, root: str | os.PathLike, n: int = 240, seed: int = 0, image_size: int = 256) -> Path:
        """n patients, 30% with 1-2 opacities (boxes in the label CSV), MGCA-style 70/15/15 split."""
        root = fresh_root(root)
        (root / IMAGES).mkdir()
        rng = np.random.default_rng(seed)
        ids = [str(uuid.UUID(bytes=rng.bytes(16), version=4)) for _ in range(n)]
        positive = np.zeros(n, dtype=bool)
        positive[rng.permutation(n)[:round(PREVALENCE * n)]] = True
        label_rows, class_rows = ["patientId,x,y,width,height,Target"], ["patientId,class"]
        boxes: dict[str, list[list[float]]] = {}
        writer = FilmWriter((image_size, image_size), seed)
        for start, stop in syn.chunks(n, image_size):
            img, shift = syn.chest_batch(rng, stop - start, image_size)
            for k in range(stop - start):
                pid = ids[start + k]
                if not positive[start + k]:
                    label_rows.append(f"{pid},,,,,0")
                    class_rows.append(f"{pid},{CLASS_NAMES[1 + int(rng.random() < 0.5)]}")
                    continue
                sides = [-1.0, 1.0] if rng.random() < 0.5 else [float(rng.choice([-1.0, 1.0]))]
                for side in sides:
                    cx = 0.5 + shift[k, 0] + side * 0.18 + rng.uniform(-0.04, 0.04)
                    cy = 0.47 + shift[k, 1] + rng.uniform(0.0, 0.16)
                    sx, sy = rng.uniform(0.05, 0.07), rng.uniform(0.06, 0.09)
                    syn.add_blob(img, k, cx, cy, sx, sy, rng.uniform(0.3, 0.4))
                    box = [round(float(v) * image_size, 1) for v in (cx - 1.5 * sx, cy - 1.5 * sy, 3 * sx, 3 * sy)]
                    label_rows.append(f"{pid},{box[0]},{box[1]},{box[2]},{box[3]},1")
                    class_rows.append(f"{pid},{CLASS_NAMES[0]}")
                    boxes.setdefault(pid, []).append([box[0], box[1], round(box[0] + box[2], 1),
                                                      round(box[1] + box[3], 1)])
            for k, px in enumerate(syn.to_uint8(img)):
                (root / IMAGES / f"{ids[start + k]}.dcm").write_bytes(writer.film_bytes(px, ids[start + k]))
        (root / LABELS).write_text("\n".join(label_rows) + "\n")
        (root / CLASSINFO).write_text("\n".join(class_rows) + "\n")
        order = rng.permutation(n)
        n_train, n_val = round(0.7 * n), round(0.15 * n)
        parts = {"train": order[:n_train], "val": order[n_train:n_train + n_val], "test": order[n_train + n_val:]}
        for split, idx in parts.items():
            # MGCA's columns: pandas writes the box list as "[[x1, y1, x2, y2], ...]", None as "".
            lines = ["patientId,bbox,Target"] + [
                f'{ids[i]},"{boxes[ids[i]]}",1' if positive[i] else f"{ids[i]},,0" for i in idx]
            (root / SPLIT_FILES[split]).write_text("\n".join(lines) + "\n")
        return root


# -- synthetic DICOM files ----------------------------------------------------------------------------
# pydicom spends ~3 ms building and writing each file (a minute for 20k films), so synth writes one
# template with pydicom and then swaps in each film's fixed-length values and pixel data; a test
# checks the bytes equal what pydicom writes for the same film.
_PIXEL_DATA = b"\xe0\x7f\x10\x00OB\x00\x00\xff\xff\xff\xff"  # (7FE0,0010) OB, undefined length
_SEQ_END = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
_PH_PID = "X" * 36  # placeholder patientId (a UUID: 36 characters)
_PH_UIDS = tuple("2.25." + d * 38 for d in "123")  # placeholder SOP, study, series UIDs


def film_uids(seed: int, patient_id: str) -> tuple[str, ...]:
    """Deterministic SOP/study/series UIDs of 43 characters (2.25.<38 digits>)."""
    out = []
    for part in ("sop", "study", "series"):
        h = int(hashlib.sha256(f"{seed}/{patient_id}/{part}".encode()).hexdigest(), 16)
        out.append(f"2.25.{10**37 + h % (9 * 10**37)}")
    return tuple(out)


def jpeg_bytes(pixels: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def film_dataset(jpeg: bytes, shape: tuple[int, int], patient_id: str, uids: tuple[str, ...]):
    """A film as the RSNA release stores it: 8-bit MONOCHROME2, JPEG baseline, CR secondary capture."""
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGBaseline8Bit, SecondaryCaptureImageStorage

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = uids[0]
    meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = SecondaryCaptureImageStorage, uids[0]
    ds.StudyInstanceUID, ds.SeriesInstanceUID = uids[1], uids[2]
    ds.PatientID = ds.PatientName = patient_id
    ds.Modality, ds.BodyPartExamined, ds.ViewPosition, ds.ConversionType = "CR", "CHEST", "PA", "WSD"
    ds.Rows, ds.Columns = shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelSpacing = [f"{0.143 * 1024 / shape[0]:.4f}"] * 2
    ds.LossyImageCompression = "01"
    ds.PixelData = encapsulate([jpeg])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    return ds


def dicom_bytes(ds) -> bytes:
    import pydicom

    buf = io.BytesIO()
    try:
        pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    except TypeError:  # pydicom < 3
        ds.is_little_endian, ds.is_implicit_VR = True, False
        ds.save_as(buf, write_like_original=False)
    return buf.getvalue()


class FilmWriter:
    """Writes synthetic RSNA films of one size fast (see above)."""

    def __init__(self, shape: tuple[int, int], seed: int):
        from pydicom.encaps import encapsulate

        self._encapsulate, self.seed = encapsulate, seed
        template = dicom_bytes(film_dataset(b"\0\0", shape, _PH_PID, _PH_UIDS))
        self.header = template[:template.rindex(_PIXEL_DATA)]

    def film_bytes(self, pixels: np.ndarray, patient_id: str) -> bytes:
        if len(patient_id) != len(_PH_PID):
            raise ValueError(f"synthetic patientId {patient_id!r} must have {len(_PH_PID)} characters")
        data = self.header.replace(_PH_PID.encode(), patient_id.encode())
        for ph, uid in zip(_PH_UIDS, film_uids(self.seed, patient_id), strict=True):
            data = data.replace(ph.encode(), uid.encode())
        return data + _PIXEL_DATA + self._encapsulate([jpeg_bytes(pixels)]) + _SEQ_END
