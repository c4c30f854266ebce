"""Sweep configs: every shipped file loads; bad input is rejected with the offending key's path."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from orchestrator.grid.config import load_config, parse_config
from tasks.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


def _base() -> dict:
    return yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())


def test_configs_directory_is_not_empty():
    assert {p.name for p in CONFIGS} >= {"demo.yaml", "paper.yaml"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_validates(path):
    cfg = load_config(path)
    assert cfg.n_cells() > 0


def test_demo_config_is_the_laptop_grid():
    cfg = load_config(REPO / "configs" / "demo.yaml")
    assert cfg.weights == "random"
    assert cfg.n_cells() == 16 * 3  # x three training-set sizes (the data axis)
    assert cfg.resolved_tracking_uri == f"sqlite:///{cfg.output_path / 'mlflow.db'}"


def test_paper_config_is_the_published_grid():
    cfg = load_config(REPO / "configs" / "paper.yaml")
    g = cfg.grid
    assert g.encoders == ["dinov3_vits16", "dinov3_vitb16", "dinov3_vitl16"]
    assert g.resolutions == [224, 256, 384, 512, 768, 1024]
    assert set(g.datasets) == {"nih14", "rsna_pneumonia"}
    assert len(g.seeds) == 5 and cfg.weights == "hub"


@pytest.mark.parametrize(
    "mutate, path_fragment",
    [
        (lambda c: c.update(colour="red"), "colour: unknown key"),
        (lambda c: c["grid"].update(encoder=["x"]), "grid.encoder: unknown key"),
        (lambda c: c["grid"].update(resolutions=[112, 100]), "grid.resolutions.1: 100 is not a multiple of 16"),
        (lambda c: c["grid"].update(encoders=["dinov3_vits16", "vit_giant"]), "unknown encoder 'vit_giant'"),
        (lambda c: c["grid"].update(datasets=["nih14", "mimic"]), "unknown dataset 'mimic'"),
        (lambda c: c.update(weights="imagenet"), "weights: weights must be 'hub', 'random' or 'file:<path>'"),
        (lambda c: c["data"].pop("rsna_pneumonia"), "no root given for dataset(s) ['rsna_pneumonia']"),
        (lambda c: c["resources"].update(cell_gpus={"small": 2.0}), "resources.cell_gpus"),
        (lambda c: c["protocols"]["knn"].update(kk=3), "protocols.knn"),
        (lambda c: c.update(pooling="max"), "pooling"),
        (lambda c: c["protocols"]["knn"].update(seed=3), "protocols.knn: ['seed'] cannot be set here"),
        (lambda c: c["resources"].update(cell_gpus={"small": {0: 0.5, 224: 0.2}}), "must not shrink"),
        (lambda c: c["resources"].update(cell_gpus={"small": {224: 0.2}}), "resources.cell_gpus.small: no band covers 112"),
        (lambda c: c["resources"].update(cell_gpus={"small": {0: 1.5}}), "GPU fractions must be in [0, 1]"),
        (lambda c: c["resources"].update(extract_gpus=0.5), "encoder actors take whole GPUs"),
        (lambda c: c.update(output="s3://bucket/x"), "output is a local directory"),
        (lambda c: c.update(storage="ftp://host/x"), "unknown scheme 'ftp'"),
    ],
)
def test_bad_config_names_the_key(mutate, path_fragment):
    raw = _base()
    mutate(raw)
    with pytest.raises(ConfigError) as e:
        parse_config(raw, "demo.yaml")
    assert path_fragment in str(e.value)
    assert str(e.value).startswith("demo.yaml: invalid sweep config")


def test_dataset_options_reach_the_dataset_and_are_validated():
    raw = _base()
    raw["grid"]["datasets"].append("ct_rate")
    raw["data"]["ct_rate"] = "data/ct_rate"
    raw["dataset_options"] = {"ct_rate": {"hu_window": [-1000, 400], "slice_pooling": "max"}}
    cfg = parse_config(raw, "demo.yaml")
    assert cfg.dataset_options["ct_rate"]["hu_window"] == [-1000, 400]
    for opts, fragment in [({"hu_windw": [0, 1]}, "dataset_options.ct_rate: unknown option(s) ['hu_windw']; "
                                                  "valid: hu_window, slice_pooling"),
                           ({"hu_window": [400, -1000]}, "dataset_options.ct_rate: hu_window must be"),
                           ({"slice_pooling": "median"}, "dataset_options.ct_rate:")]:
        raw["dataset_options"] = {"ct_rate": opts}
        with pytest.raises(ConfigError, match=re.escape(fragment)):
            parse_config(raw, "demo.yaml")
    raw["dataset_options"] = {"kvasir_capsule": {}}
    with pytest.raises(ConfigError, match="options for a dataset not in grid.datasets"):
        parse_config(raw, "demo.yaml")


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_cell_gpu_share_by_size_and_resolution_band():
    raw = _base()
    raw["resources"]["cell_gpus"] = {"small": 0.1, "base": {0: 0.1, 224: 0.2, 512: 0.5}}
    res = parse_config(raw).resources
    assert res.cell_gpu_share("small", 1024) == 0.1  # a plain number: any resolution
    assert [res.cell_gpu_share("base", r) for r in (112, 224, 256, 512, 1024)] == [0.1, 0.2, 0.2, 0.5, 0.5]
    assert res.cell_gpu_share("large", 224) == 0.2  # unnamed sizes keep their defaults


def test_storage_layout_and_tracking_uri(monkeypatch, tmp_path):
    raw = _base()
    cfg = parse_config({**raw, "output": str(tmp_path / "out")})
    assert cfg.cache_root == f"{tmp_path}/out/cache" and cfg.sweep_root == f"{tmp_path}/out"  # as before
    cfg = parse_config({**raw, "storage": "s3://bucket/medscale/"})
    assert cfg.cache_root == "s3://bucket/medscale/cache"  # shared by every sweep on that storage
    assert cfg.sweep_root == "s3://bucket/medscale/demo"  # cell ids repeat across sweeps
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://10.0.0.1:5000")
    assert cfg.resolved_tracking_uri == "http://10.0.0.1:5000"  # the cluster head's server
    assert parse_config({**raw, "tracking_uri": "sqlite:///x.db"}).resolved_tracking_uri == "sqlite:///x.db"


def test_wsi_config_and_out_of_domain_test_sets():
    cfg = load_config(REPO / "configs" / "wsi.yaml")
    assert cfg.evaluate_on == {"camelyon16": ["camelyon17"]}
    # CAMELYON17 inherits CAMELYON16's tiling (not its CV folds) unless it sets its own options.
    assert cfg.options_for("camelyon17") == {"tile_size": 224, "min_tissue": 0.5}
    raw = yaml.safe_load((REPO / "configs" / "wsi.yaml").read_text())
    for mutate, fragment in [
        (lambda c: c.update(evaluate_on={"bcnb": ["camelyon17"]}), "camelyon17 (binary, 1 classes) does not match bcnb"),
        (lambda c: c.update(evaluate_on={"camelyon17": ["camelyon16"]}), "evaluate_on.camelyon17: not in grid.datasets"),
        (lambda c: c.update(evaluate_on={"camelyon16": ["nih14"]}), "nih14 must be another whole-slide dataset"),
        (lambda c: c["data"].pop("camelyon17"), "no root given for camelyon17"),
        (lambda c: c["dataset_options"]["camelyon16"].update(cv_folds=1), "cv_folds must be 0"),
    ]:
        bad = yaml.safe_load(yaml.safe_dump(raw))
        mutate(bad)
        with pytest.raises(ConfigError, match=re.escape(fragment)):
            parse_config(bad, "wsi.yaml")


def test_weights_may_map_encoders_to_sources():
    raw = _base()
    raw["grid"]["encoders"] = ["dinov3_vits16", "meddinov3_vitb16", "rad_dino"]
    raw["grid"]["resolutions"] = [224]  # a multiple of 16 and of 14
    raw["weights"] = {"default": "random", "meddinov3_vitb16": "file:/ckpt/model.pth"}
    cfg = parse_config(raw, "demo.yaml")
    assert cfg.weights_of("meddinov3_vitb16") == "file:/ckpt/model.pth"
    assert cfg.weights_of("rad_dino") == cfg.weights_of("dinov3_vits16") == "random"
    raw["weights"] = {"meddinov3_vitb16": "file:/ckpt/model.pth"}
    with pytest.raises(ConfigError, match="weights: no entry for dinov3_vits16 and no `default`"):
        parse_config(raw, "demo.yaml")
    raw["weights"] = {"meddinov3_vitb16": "hf"}
    with pytest.raises(ConfigError, match="weights.meddinov3_vitb16: weights 'hf': use 'hub'"):
        parse_config(raw, "demo.yaml")
    raw["grid"]["resolutions"] = [256]
    raw["weights"] = "random"
    with pytest.raises(ConfigError, match=r"256 is not a multiple of 14 \(patch size of rad_dino\); use 252 or 266"):
        parse_config(raw, "demo.yaml")
