"""A newcomer's path through the README: after the demo's outputs exist, the README's CPU quick
starts run for real, as written, with their outputs checked.

The demo's teacher (``demo_output/train``) is stood in for by the README's own tiny pretraining
line, run in a scratch folder whose ``configs/`` is the repository's, so the commands read and
write exactly the relative paths the README shows. Only the run length is shortened (appended
options, listed in RUN_FOR_REAL); the shipped tiny train and distill configs otherwise run as
shipped, with their own default datasets. Every other README command is parsed and its config
validated by tests/test_readme_commands.py.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from test_readme_commands import readme_commands

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

TINY_TRAIN = "dinov2-repro train --config-file configs/train/vit_tiny_cpu.yaml train.output_dir=runs/tiny"
TINY_DISTILL = "dinov2-repro distill --config-file configs/distill/tiny_cpu.yaml --teacher demo_output/train"
STUDENT_EVAL = "dinov2-repro eval landcover --backbone runs/distill_tiny/export/student_vit_micro_backbone.safetensors"
SEG = ("dinov2-repro eval seg --data landsat --bands 3,2,1 --backbone demo_output/train/export/teacher_backbone.safetensors "
       "--decoder unet --out-dir runs/seg_demo")
PREDICT = "dinov2-repro predict seg --checkpoint runs/seg_demo --scene runs/seg_demo/landsat_6band.tif --out runs/seg_demo/map.tif"
# README line -> what is appended to keep the test short (None: nothing); in the order a newcomer runs them.
RUN_FOR_REAL = {
    TINY_TRAIN: ["train.max_iterations=3"],
    TINY_DISTILL: ["train.max_iterations=3"],
    STUDENT_EVAL: ["--baselines", "none"],
    SEG: ["--iterations", "10"],
    PREDICT: None,
}


def _readme_lines() -> list[str]:
    return [" ".join(line.split()) for name, line in readme_commands() if name == "README.md"]


def test_every_cpu_quick_start_of_the_readme_is_run_here() -> None:
    """The lines above are the README's (so they cannot drift), and every README line that works on
    the demo's outputs or on the tiny recipes in this process is among them."""
    lines = _readme_lines()
    missing = [line for line in RUN_FOR_REAL if line not in lines]
    assert not missing, f"README no longer shows {missing}: update RUN_FOR_REAL"
    cpu_lines = [line for line in lines if ("demo_output/" in line or "tiny_cpu" in line or "distill_tiny" in line)
                 and "--launcher" not in line]
    assert set(cpu_lines) <= set(RUN_FOR_REAL), f"CPU quick starts not run for real: {set(cpu_lines) - set(RUN_FOR_REAL)}"


def _run(line: str, home: Path) -> str:
    import shlex

    argv = shlex.split(line)[1:] + (RUN_FOR_REAL[line] or [])
    done = subprocess.run([sys.executable, "-m", "dinov2_repro.cli", *argv], cwd=home, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, f"`{line}` failed:\n{done.stderr[-3000:]}"
    return done.stdout


def _last_json(stdout: str) -> dict:
    """The JSON result a verb prints last (single-line or indented)."""
    start = max(stdout.rfind("\n{"), -1) + 1
    return json.loads(stdout[start:])


def test_readme_quick_starts_run_after_the_demo(tmp_path: Path) -> None:
    home = tmp_path / "newcomer"
    home.mkdir()
    (home / "configs").symlink_to(ROOT / "configs")

    result = _last_json(_run(TINY_TRAIN, home))
    assert result["iteration"] == 3
    teacher = home / "runs" / "tiny"
    assert (teacher / "export" / "teacher_backbone.safetensors").is_file()
    # What `make demo` leaves: the tiny teacher's run at demo_output/train.
    (home / "demo_output").mkdir()
    (home / "demo_output" / "train").symlink_to(teacher)

    result = _last_json(_run(TINY_DISTILL, home))
    assert result["iteration"] == 3
    assert result["exports"] == {"vit_micro": "runs/distill_tiny/export/student_vit_micro_backbone.safetensors"}
    assert (home / result["exports"]["vit_micro"]).is_file()

    result = _last_json(_run(STUDENT_EVAL, home))
    assert 0.0 <= result["knn_top1_trained"] <= 1.0 and result["n_test"] > 0, result

    _run(SEG, home)
    seg = home / "runs" / "seg_demo"
    metrics = json.loads((seg / "metrics.json").read_text())
    assert 0.0 <= metrics["test"]["miou"] <= 1.0, metrics.keys()
    assert (seg / "seg_run.json").is_file() and (seg / "head.safetensors").is_file()

    _run(PREDICT, home)
    import rasterio

    with rasterio.open(seg / "map.tif") as written, rasterio.open(seg / "landsat_6band.tif") as scene:
        assert (written.width, written.height, written.crs) == (scene.width, scene.height, scene.crs)
    assert (seg / "map.png").is_file()
