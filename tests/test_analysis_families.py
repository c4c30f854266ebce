"""Encoder families in the analysis: curves per family, and the "families at matched compute" table."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from analysis.families import UNKNOWN, families_of, family_of, matched_compute, with_family
from analysis.points import aggregate, read_points_csv
from analysis.report import analyze_points
from tasks.encoders import get_encoder_spec

# (encoder, true mean AUC): the domain model (biomedclip, ~35 GFLOPs at 224) beats DINOv3-B at the
# same compute but trails DINOv3-L; the ResNet50 baseline (~6.6 GFLOPs) has nothing to match.
TRUTH = {"dinov3_vits16": 0.70, "dinov3_vitb16": 0.74, "dinov3_vitl16": 0.80, "biomedclip": 0.76,
         "resnet50_trunc": 0.60}


def family_points(with_family_column: bool) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    rows = []
    for enc, auc in TRUTH.items():
        spec = get_encoder_spec(enc)
        for seed in range(3):
            row = {"dataset": "nih14", "protocol": "linear_probe", "metric": "auc", "encoder": enc,
                   "params": spec.params, "gflops": spec.gflops(224), "resolution": 224, "seed": seed,
                   "weights": "hub", "run_id": f"{enc}-{seed}", "value": auc + rng.normal(0, 0.002)}
            if with_family_column:
                row["family"] = spec.family
            rows.append(row)
    return pd.DataFrame(rows)


def test_family_comes_from_the_logged_column_else_the_registry():
    pts = family_points(with_family_column=False)
    agg = with_family(aggregate(pts), pts)
    assert dict(zip(agg["encoder"], agg["family"], strict=True))["biomedclip"] == "biomedclip"
    assert family_of("resnet50_trunc") == "resnet" and family_of("someone_elses_vit") == "someone"
    logged = pts.assign(family=np.where(pts["encoder"] == "biomedclip", "clip", ""))
    agg = with_family(aggregate(logged), logged)
    fam = dict(zip(agg["encoder"], agg["family"], strict=True))
    assert fam["biomedclip"] == "clip" and fam["dinov3_vitl16"] == "dinov3"  # empty -> registry


def test_matched_compute_ranks_each_familys_best_inside_one_window():
    pts = family_points(with_family_column=True)
    table = matched_compute(with_family(aggregate(pts), pts))
    # Windows [g, 2g] holding DINOv3 and another family: [6.6, 13.1] (ResNet50, DINOv3-S) and
    # [35.1, 70.3] (BiomedCLIP, DINOv3-B); the larger wins the tie. ResNet50 is listed, unranked.
    assert list(table["family"]) == ["biomedclip", "dinov3", "resnet"]
    assert list(table["encoder"]) == ["biomedclip", "dinov3_vitb16", "resnet50_trunc"]
    assert list(table["rank"]) == [1, 2, "outside"]
    g = get_encoder_spec("biomedclip").gflops(224)
    assert table["window"].iloc[0] == f"{g:.1f}-{2 * g:.1f} GFLOPs"
    assert table["vs_best_generalist"].iloc[0].startswith("trails dinov3_vitl16 @ 224 px")
    # A lower-is-better metric flips "best": the same cells scored as an error rate.
    err = pts.assign(metric="hd95", value=1 - pts["value"])
    t2 = matched_compute(with_family(aggregate(err), err))
    assert list(t2["encoder"]) == ["biomedclip", "dinov3_vitb16", "resnet50_trunc"]
    # Families never within 2x of each other (BiomedCLIP 35 vs ResNet50 6.6 GFLOPs): no comparison.
    other = pts[~pts["encoder"].str.startswith("dinov3")]
    assert matched_compute(with_family(aggregate(other), other)).empty


def test_report_has_the_family_table_and_curves_per_family(tmp_path):
    pts = family_points(with_family_column=True)
    res = analyze_points(pts, tmp_path, title="families", n_boot=200)
    csv = pd.read_csv(res["families"])
    assert set(csv["family"]) == {"biomedclip", "dinov3", "resnet"}
    report = res["report"].read_text()
    assert "## Families at matched compute" in report and "trails dinov3_vitl16" in report
    fixed = {c.key.fixed for c in res["study"].curves if c.key.axis in ("params", "gflops")}
    # Only DINOv3 has >= 2 encoders: its params curve is per family; no curve mixes designs.
    assert fixed == {"224 px, dinov3"}
    assert all(set(c.cells["family"]) == {"dinov3"} for c in res["study"].curves)


def test_one_family_keeps_the_curves_it_always_had(tmp_path):
    pts = family_points(with_family_column=True)
    pts = pts[pts["encoder"].str.startswith("dinov3")]
    res = analyze_points(pts, tmp_path, title="dinov3 only", n_boot=200)
    assert {c.key.fixed for c in res["study"].curves} == {"224 px"}
    assert pd.read_csv(res["families"]).empty
    assert "Families at matched compute" not in res["report"].read_text()


@pytest.mark.parametrize("name", ["biomedclip", "uni", "resnet50_trunc", "rad_dino", "meddinov3_vitb16"])
def test_every_family_entry_names_its_family(name):
    assert family_of(name) == get_encoder_spec(name).family != "dinov3"


def test_hub_and_file_checkpoints_meet_in_one_table_random_init_stays_apart():
    """A domain checkpoint read with `file:` (MedDINOv3's) is compared with hub-loaded generalists;
    a random-init cell never is."""
    pts = family_points(with_family_column=True)
    pts.loc[pts["encoder"] == "biomedclip", "weights"] = "file"
    table = matched_compute(with_family(aggregate(pts), pts))
    assert set(table["weights"]) == {"pretrained"} and "biomedclip" in set(table["family"])
    pts.loc[pts["encoder"] == "biomedclip", "weights"] = "random"
    table = matched_compute(with_family(aggregate(pts), pts))
    assert "biomedclip" not in set(table[table["weights"] == "pretrained"]["family"])


@pytest.mark.parametrize(("names", "family"), [(("vit_small", "vit_base", "vit_large"), "vit"),
                                                (("ViT-S/16", "ViT-B/16", "ViT-L/16"), "ViT"),
                                                (("ViTS", "ViTB", "ViTL"), UNKNOWN)])
def test_unknown_encoders_make_one_family_and_keep_their_parameter_curves(tmp_path, names, family):
    from analysis.study import build_study

    rows = []
    for name, params in zip(names, (2e7, 9e7, 3e8), strict=True):
        for res in (224, 512):
            for seed in range(3):
                rows.append({"dataset": "d", "protocol": "linear_probe", "metric": "auc", "encoder": name,
                             "params": params, "gflops": "", "resolution": res, "seed": seed,
                             "value": 0.7 + 0.02 * np.log10(params / 2e7) + 0.01 * (res == 512) + 0.001 * seed})
    path = tmp_path / "points.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    pts = read_points_csv(path)
    assert set(families_of(pts["encoder"]).values()) == {family}
    axes = sorted(k.axis for k in build_study(pts, n_boot=20).verdicts)
    # one family: a parameter curve per resolution, not none (a family of one encoder has no curve)
    assert axes == ["params", "params", "resolution", "resolution", "resolution"]
    # a `family` column names them: two families, and the one of two encoders keeps its curves
    named = read_points_csv(_with_column(path, tmp_path, "family", ["a" if n != names[1] else "b" for n in pts["encoder"]]))
    keys = build_study(named, n_boot=20).verdicts
    assert sorted(k.fixed for k in keys if k.axis == "params") == ["224 px, a", "512 px, a"]


def _with_column(path, tmp_path, column, values):
    df = pd.read_csv(path)
    df[column] = values
    out = tmp_path / f"with_{column}.csv"
    df.to_csv(out, index=False)
    return out
