"""Shared pytest fixtures: small real datasets built once per session from data shipped in packages."""
from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def demo_image_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ImageFolder of 56 px PNG tiles (landsat/, rmnp/, natural/; ~150 images) from shipped data."""
    from dinov2_repro.data.sample_data import write_demo_image_folder

    return write_demo_image_folder(tmp_path_factory.mktemp("demo") / "images", tile=56)


@pytest.fixture(scope="session")
def landsat_stack_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """6-band GeoTIFF (Landsat-7 ETM+ bands 1,2,3,4,5,7; float32, nodata -99999, 443x489 px)."""
    from dinov2_repro.data.sample_data import write_landsat_stack

    return write_landsat_stack(tmp_path_factory.mktemp("landsat") / "lsat7_2000_stack.tif")


@pytest.fixture
def one_torch_thread():
    """Tiny tensors on a shared 2-core machine: a second intra-op thread only adds contention
    (measured: up to 20x slower under load). Restored afterwards."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """A test that asks for the ``slurm_cluster`` fixture needs the local cluster: mark it ``slurm``
    (so ``-m "not slurm"`` leaves it out) without each test having to say so."""
    for item in items:
        if "slurm_cluster" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slurm)
