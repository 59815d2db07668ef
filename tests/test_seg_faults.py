"""Segmentation faults met as a user meets them: an output that is an input, a truncated scene.

Run alone with ``pytest -m faults``."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from dinov2_repro.config import ConfigError
from test_seg import _scene, _tiny_vit, _write_tif

pytestmark = pytest.mark.faults


def _cli(capfd, *argv: str) -> tuple[int, list[str]]:
    """Exit code and the non-empty stderr lines (fd-level: GDAL's own messages would show) of one CLI call."""
    from dinov2_repro.cli import main

    capfd.readouterr()
    code = main(list(argv))
    err = capfd.readouterr().err
    return code, [line for line in err.splitlines() if line.strip() and "it/s" not in line and "row/s" not in line]


@pytest.fixture(scope="module")
def seg_run(tmp_path_factory) -> tuple[Path, Path]:
    """(run directory of a 1-iteration linear head, its 3-band scene)."""
    from dinov2_repro.backbone_file import save_backbone
    from dinov2_repro.eval.segmentation.train import ModelSpec, prepare_data, run_segmentation

    root = tmp_path_factory.mktemp("segfaults")
    (root / "data" / "images").mkdir(parents=True)
    (root / "data" / "masks").mkdir()
    image, labels = _scene()
    scene = _write_tif(root / "data" / "images" / "scene.tif", image, nodata=-9999.0)
    _write_tif(root / "data" / "masks" / "scene.tif", labels, nodata=0)
    backbone = save_backbone(_tiny_vit(3), root / "tiny.safetensors", arch="custom", mean=(0.5,) * 3, std=(0.25,) * 3)
    data = prepare_data(data=str(root / "data"), workdir=root, tile=28)
    run_segmentation(ModelSpec("t", "vit", str(backbone), "linear"), data, out_dir=root / "run", iterations=1, progress=False)
    return root / "run", scene


@pytest.mark.timeout(120)
def test_predict_refuses_to_overwrite_its_scene_and_leaves_it_intact(seg_run, tmp_path, capfd):
    run, scene = seg_run
    before = scene.read_bytes()
    link = tmp_path / "alias.tif"
    link.symlink_to(scene)
    for out in (scene, link, Path(os.path.relpath(scene))):
        code, lines = _cli(capfd, "predict", "seg", "--checkpoint", str(run), "--scene", str(scene), "--out", str(out))
        assert code == 2, lines
        assert len(lines) == 1 and "refusing to overwrite an input" in lines[0] and "--scene" in lines[0], lines
    assert scene.read_bytes() == before
    code, lines = _cli(capfd, "predict", "seg", "--checkpoint", str(run), "--scene", str(scene),
                       "--out", str(run / "seg_run.json"))
    assert code == 2 and "--checkpoint" in lines[0]


def test_every_writing_verb_applies_the_same_rule(tmp_path):
    from dinov2_repro.cli import main
    from dinov2_repro.io.paths import refuse_overwriting_inputs

    config = tmp_path / "c.yaml"
    config.write_text("{}\n")
    backbone = tmp_path / "b.safetensors"
    backbone.write_bytes(b"x")
    assert main(["plan", "--config-file", str(config), "--out", str(config)]) == 2
    assert main(["eval", "knn", "--backbone", str(backbone), "--train", "a", "--val", "b", "--out", str(backbone)]) == 2
    assert main(["export", "--checkpoint", str(tmp_path), "--out", str(backbone)]) == 2
    assert config.read_text() == "{}\n" and backbone.read_bytes() == b"x"
    with pytest.raises(ConfigError, match="are the same file"):
        refuse_overwriting_inputs(outputs={"--out": tmp_path / "a.tif", "--vector": tmp_path / "." / "a.tif"}, inputs={})
    refuse_overwriting_inputs(outputs={"--out": tmp_path / "new.tif"}, inputs={"--scene": tmp_path / "c.yaml"})


@pytest.mark.timeout(120)
def test_truncated_scene_is_one_line_naming_file_and_window_exit_2(seg_run, tmp_path, capfd):
    from dinov2_repro.io.raster import RasterReadError, read_window

    run, scene = seg_run
    height, width = 112, 168
    truncated = tmp_path / "truncated.tif"
    data = np.random.default_rng(0).normal(100, 10, (3, height, width)).astype(np.float32)
    import rasterio

    # Striped (not tiled), uncompressed: the second half of the rows lies in the cut-off bytes.
    full = _write_tif(tmp_path / "full.tif", data, nodata=-9999.0)
    with rasterio.open(full) as src:
        assert src.profile.get("tiled") in (False, None)
    blob = full.read_bytes()
    truncated.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(RasterReadError, match=r"truncated\.tif: cannot read window \[col_off, row_off, width, height\] = \[0, 84, 28, 28\]"):
        read_window(truncated, [1, 2, 3], (0, 84, 28, 28), np.array([[0.0, 1.0]] * 3))
    out = tmp_path / "map.tif"
    code, lines = _cli(capfd, "predict", "seg", "--checkpoint", str(run), "--scene", str(truncated), "--out", str(out))
    assert code == 2, lines
    assert len(lines) == 1 and str(truncated) in lines[0] and "truncated or corrupt" in lines[0], lines
    assert not out.exists()
