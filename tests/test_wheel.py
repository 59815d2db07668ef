"""The project as a user gets it from a wheel: built from this tree, installed with no
dependencies into a temporary folder, run with this interpreter from outside the repository.
It must own only the name ``dinov2_repro``, ship its recipes, and train and curate from them."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Folders of a working tree that are not sources (and may be large): left out of the build copy.
NOT_SOURCES = {".git", ".venv", "build", "dist", "demo_output", "output", "runs", "slurm_logs", "__pycache__",
               ".pytest_cache"}

TINY = ["student.arch=vit_micro", "crops.global_crops_size=28", "crops.local_crops_size=14", "crops.local_crops_number=2",
        "train.batch_size_per_gpu=4", "train.OFFICIAL_EPOCH_LENGTH=2", "optim.epochs=1", "optim.warmup_epochs=0",
        "teacher.warmup_teacher_temp_epochs=0", "train.num_workers=0", "train.tensorboard=false",
        *[f"{k}.head_n_prototypes=64" for k in ("dino", "ibot")], *[f"{k}.head_hidden_dim=64" for k in ("dino", "ibot")],
        *[f"{k}.head_bottleneck_dim=32" for k in ("dino", "ibot")]]


def _ignore(folder: str, names: list[str]) -> set[str]:
    return {n for n in names if n in NOT_SOURCES or n.endswith(".egg-info")}


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel of this tree installed (``pip install --no-deps --target``) into a fresh folder."""
    work = tmp_path_factory.mktemp("wheel")
    source = work / "src"
    # Build from a copy so the build's own folders never land in the working tree.
    shutil.copytree(ROOT, source, symlinks=True, ignore=_ignore)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(work / "dist"),
                    str(source)], check=True, capture_output=True, timeout=600)
    wheel = next((work / "dist").glob("dinov2_repro-*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
    top = {n.split("/")[0] for n in names}
    assert top == {"dinov2_repro", next(t for t in top if t.endswith(".dist-info"))}, top
    assert "dinov2_repro/configs/train/vit_tiny_cpu.yaml" in names and "dinov2_repro/configs/curation/demo.yaml" in names
    target = work / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-compile", "-q", "--target", str(target),
                    str(wheel)], check=True, capture_output=True, timeout=600)
    return target


def _run(installed: Path, cwd: Path, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    # Only the install folder on the path (the tree's own PYTHONPATH would shadow it), the console
    # script run by this interpreter (its shebang names the interpreter pip ran under).
    env = {**os.environ, "PYTHONPATH": str(installed), "DINOV2_REPRO_CACHE": str(cwd / "cache")}
    return subprocess.run([sys.executable, str(installed / "bin" / "dinov2-repro"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_wheel_trains_and_curates_from_shipped_recipes(installed: Path, tmp_path: Path) -> None:
    where = subprocess.run([sys.executable, "-c", "import dinov2_repro; print(dinov2_repro.__file__)"], cwd=tmp_path,
                           env={**os.environ, "PYTHONPATH": str(installed)}, capture_output=True, text=True, check=True)
    assert where.stdout.strip().startswith(str(installed)), where.stdout  # the installed copy, not the tree
    curate = _run(installed, tmp_path, "curate", "--help")
    assert curate.returncode == 0 and "tile" in curate.stdout, curate.stderr
    # A shipped recipe by name, with its default dataset (images shipped with the install).
    train = _run(installed, tmp_path, "train", "--config-file", "vit_tiny_cpu.yaml", "train.output_dir=run", *TINY)
    assert train.returncode == 0, train.stderr[-3000:]
    result = json.loads(train.stdout.strip().splitlines()[-1])
    assert result["iteration"] == 2
    assert (tmp_path / "run" / "export" / "teacher_backbone.safetensors").is_file()
    bad = _run(installed, tmp_path, "train", "--config-file", "no_such_recipe", timeout=120)
    assert bad.returncode == 2 and "vit_tiny_cpu" in bad.stderr and "Traceback" not in bad.stderr
