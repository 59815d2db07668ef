"""The real training job on the project's local Slurm cluster (launch/local_slurm/start_cluster.sh):
(a) `dinov2-repro train --launcher slurm` with 2 tasks finishes and leaves a valid checkpoint;
(b) a job preempted mid-run is requeued by Slurm, resumes from its last checkpoint, and ends
with exactly the weights of an uninterrupted run."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from test_scale_out import cli, train_args
from test_slurm import _options, _wait_done, preempt, slurm_cluster  # noqa: F401  (fixture)

from dinov2_repro.train.checkpoint import last_checkpoint, load_model_state, read_meta
from dinov2_repro.train.meta_arch import SSLMetaArch
from dinov2_repro.launch.slurm import slurm_job_info, submit_slurm

REPO = Path(__file__).resolve().parents[1]


def _state(run_dir: Path) -> dict[str, torch.Tensor]:
    checkpoint = last_checkpoint(run_dir)
    model = SSLMetaArch(OmegaConf.create(read_meta(checkpoint)["config"]))
    load_model_state(checkpoint, model)
    return model.state_dict()


def _wait_state(job_id: str, timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    state = ""
    while time.monotonic() < deadline:
        state = slurm_job_info(job_id).get("JobState", "")
        if state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
            return state
        time.sleep(0.5)
    return state


@pytest.mark.timeout(240)
def test_cli_submits_two_task_training_job(slurm_cluster, demo_image_folder, tmp_path):  # noqa: F811
    run = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "dinov2_repro.cli", "train", "--launcher", "slurm", "--nproc", "2", "--timeout", "20",
         "--mem-gb", "2", "--slurm-output-dir", str(tmp_path / "slurm" / "%j"),
         *train_args(run, demo_image_folder, 1)[1:]],
        capture_output=True, text=True, timeout=60, cwd=REPO)
    assert result.returncode == 0, result.stderr
    job_id = re.search(r"submitted Slurm job (\d+)", result.stdout).group(1)
    state = _wait_state(job_id, 200)
    logs = "\n".join(p.read_text() for p in (tmp_path / "slurm").rglob("*.out")) if (tmp_path / "slurm").exists() else ""
    assert state == "COMPLETED", f"job {job_id} ended {state}:\n{logs[-4000:]}"
    checkpoint = last_checkpoint(run)
    meta = read_meta(checkpoint)
    assert meta["iteration"] == 2 and meta["world_size"] == 2
    assert len(list(checkpoint.glob("*.distcp"))) == 2
    state_dict = _state(run)  # loads: the sharded checkpoint is valid
    assert all(torch.isfinite(v).all() for v in state_dict.values() if v.is_floating_point())
    assert (run / "export" / "teacher_backbone.safetensors").is_file()


@pytest.mark.timeout(420)
def test_preempted_training_requeues_resumes_and_matches_uninterrupted(slurm_cluster, demo_image_folder, tmp_path):  # noqa: F811
    epochs = 12  # 24 iterations, a checkpoint every 2
    reference = tmp_path / "reference"
    cli(*train_args(reference, demo_image_folder, epochs), nproc=2)

    run = tmp_path / "preempted"
    argv = [sys.executable, "-m", "dinov2_repro.cli", *train_args(run, demo_image_folder, epochs)]
    job = submit_slurm(argv, _options(tmp_path), workdir=REPO)
    deadline, seen = time.monotonic() + 150, 0
    while seen < 4:
        assert time.monotonic() < deadline, f"no checkpoint after 150 s:\n{job.stdout()}\n{job.stderr()}"
        try:
            pointer = last_checkpoint(run)
            seen = read_meta(pointer)["iteration"] if pointer else 0
        except (FileNotFoundError, RuntimeError):
            pass  # pointer replaced while reading
        time.sleep(0.1)
    assert seen < 2 * epochs, "the job finished before it could be preempted"
    preempt(job)  # what Slurm does on preemption: SIGTERM, then USR2 to every task
    _wait_done(job, timeout_s=240)

    assert slurm_job_info(job.job_id).get("Restarts") == "1"
    log = (run / "logs" / "rank0.log").read_text()
    resumed = [int(m) for m in re.findall(r"resumed from .*iter_(\d+) at iteration", log)]
    assert resumed and seen <= resumed[0] < 2 * epochs, log[-3000:]
    assert read_meta(last_checkpoint(run))["iteration"] == 2 * epochs
    expected, got = _state(reference), _state(run)
    different = [k for k in expected if not torch.equal(expected[k], got[k])]
    assert not different, f"preempted run differs from the uninterrupted one in {different[:5]}"
    assert os.path.exists(run / "export" / "teacher_backbone.safetensors")
