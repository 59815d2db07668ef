"""Slurm launcher: parameter mapping and CommandJob logic everywhere; real jobs on the local cluster.

The cluster tests need the single-node cluster of launch/local_slurm/start_cluster.sh
(``make test`` starts it when run as root). Without it they are skipped, except when the
cluster is required (DINOV2_REQUIRE_SLURM=1 or CI=true): then a missing cluster fails.
DINOV2_NO_SLURM=1 opts out explicitly (skip even in CI).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from dinov2_repro.launch.options import LauncherOptions
from dinov2_repro.launch.slurm import CommandJob, parse_python_command, slurm_job_info, slurm_parameters, submit_slurm

# The toy "training" update, shared verbatim by the job script and the reference below.
STEP_SRC = textwrap.dedent("""
    def initial_state():
        return torch.arange(5, dtype=torch.float64) * 0.1

    def contribution(x, iteration, rank):
        return torch.sin(x * (rank + 1) + iteration)

    def update(x, reduced):
        return 0.9 * x + 0.1 * reduced
""")

# A resumable 2-rank job: all_reduce per iteration, atomic checkpoint every iteration into
# <output_dir>/checkpoints/last, resume from it when present (the training CLI's contract).
TOY_TRAIN = "import torch\n" + STEP_SRC + textwrap.dedent("""
    import argparse, json, os, time
    from pathlib import Path
    import torch.distributed as dist
    from dinov2_repro.distributed import init_distributed, shutdown_distributed, barrier

    parser = argparse.ArgumentParser()
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--iters", type=int, required=True)
    parser.add_argument("--sleep", type=float, default=0.0)
    args = parser.parse_args()
    env = init_distributed(backend="gloo", timeout_s=120)
    out = Path(args.output_dir)
    last = out / "checkpoints" / "last"
    x, start = initial_state(), torch.zeros(1, dtype=torch.int64)
    if env.rank == 0 and last.exists():
        saved = torch.load(last)
        x, start[0] = saved["x"], saved["iteration"]
    dist.broadcast(x, src=0)
    dist.broadcast(start, src=0)
    start = int(start)
    if env.rank == 0:
        print(f"toy: {'resuming from iteration ' + str(start) if start else 'starting from scratch'}", flush=True)
        with open(out / "events.jsonl", "a") as f:
            f.write(json.dumps({"restart_count": int(os.environ.get("SLURM_RESTART_COUNT", 0)),
                                "start_iteration": start, "world_size": env.world_size,
                                "source": env.source, "omp": os.environ.get("OMP_NUM_THREADS")}) + "\\n")
    for it in range(start, args.iters):
        reduced = contribution(x, it, env.rank)
        dist.all_reduce(reduced)
        x = update(x, reduced)
        if env.rank == 0:
            tmp = last.with_name("last.tmp")
            torch.save({"iteration": it + 1, "x": x}, tmp)
            os.replace(tmp, last)
        time.sleep(args.sleep)
    barrier()
    shutdown_distributed()
""")


def reference_state(iterations: int, world_size: int = 2) -> torch.Tensor:
    """The uninterrupted run's final state, computed in this process."""
    namespace: dict = {"torch": torch}
    exec(STEP_SRC, namespace)
    x = namespace["initial_state"]()
    for it in range(iterations):
        reduced = namespace["contribution"](x, it, 0)
        for rank in range(1, world_size):
            reduced = reduced + namespace["contribution"](x, it, rank)
        x = namespace["update"](x, reduced)
    return x


# --------------------------------------------------------------------------- no cluster needed
def test_slurm_parameters_cpu_and_gpu(tmp_path):
    cpu = slurm_parameters(LauncherOptions(launcher="slurm", nproc=2, timeout_min=30, partition="debug",
                                           mem_gb=4.0, extra_slurm={"exclusive": True}), workdir=tmp_path)
    assert cpu["tasks_per_node"] == 2 and cpu["nodes"] == 1 and "gpus_per_node" not in cpu
    assert cpu["timeout_min"] == 30 and cpu["mem_gb"] == 4.0 and cpu["slurm_partition"] == "debug"
    assert "slurm_account" not in cpu and "cpus_per_task" not in cpu
    assert cpu["slurm_additional_parameters"] == {"chdir": str(tmp_path.resolve()), "requeue": True, "exclusive": True}
    assert "export OMP_NUM_THREADS=1" in cpu["slurm_setup"]
    gpu = slurm_parameters(LauncherOptions(launcher="slurm", nproc=2, nodes=4, gpus_per_node=8, cpus_per_task=10,
                                           account="proj", qos="high", constraint="h100", signal_delay_s=60),
                           workdir=tmp_path, job_env={"NCCL_DEBUG": "WARN"})
    assert gpu["tasks_per_node"] == 8 and gpu["gpus_per_node"] == 8 and gpu["nodes"] == 4
    assert (gpu["slurm_account"], gpu["slurm_qos"], gpu["slurm_constraint"]) == ("proj", "high", "h100")
    assert gpu["cpus_per_task"] == 10 and gpu["slurm_signal_delay_s"] == 60
    assert gpu["slurm_setup"] == ["export OMP_NUM_THREADS=1", "export NCCL_DEBUG=WARN"]


def test_slurm_parameters_are_accepted_by_submitit(tmp_path, monkeypatch):
    """submitit's AutoExecutor validates the keywords and renders the sbatch file (no sbatch call)."""
    import submitit
    from submitit.slurm.slurm import SlurmExecutor

    monkeypatch.setattr(SlurmExecutor, "affinity", classmethod(lambda cls: 2))  # pretend srun exists
    params = slurm_parameters(LauncherOptions(launcher="slurm", nproc=2, gpus_per_node=0, mem_gb=2.0,
                                              partition="debug", qos="q"), workdir=tmp_path)
    executor = submitit.AutoExecutor(folder=str(tmp_path / "%j"), cluster="slurm")
    executor.update_parameters(**params)
    text = executor._executor._make_submission_file_text("python -m x", "uid")
    for line in ("#SBATCH --ntasks-per-node=2", "#SBATCH --requeue", "#SBATCH --mem=2GB", "#SBATCH --qos=q",
                 f"#SBATCH --chdir={tmp_path.resolve()}", "#SBATCH --signal=USR2@120", "export OMP_NUM_THREADS=1",
                 "#SBATCH --partition=debug", "#SBATCH --job-name=dinov2_repro"):
        assert line in text, f"{line!r} missing from\n{text}"
    assert "--gpus-per-node" not in text


@pytest.mark.parametrize("argv, expected", [
    ([sys.executable, "-m", "dinov2_repro.cli", "train", "--x"], ("module", "dinov2_repro.cli", ["train", "--x"])),
    (["python3", "-u", "script.py", "a"], ("script", "script.py", ["a"])),
])
def test_parse_python_command(argv, expected):
    assert parse_python_command(argv) == expected


@pytest.mark.parametrize("argv, message", [
    (["train", "--config", "x.yaml"], "full Python command line"),
    (["bash", "-c", "true"], "full Python command line"),
    ([sys.executable, "-m"], "without a module"),
    ([sys.executable, "-X", "dev", "x.py"], "'-X'"),
    ([sys.executable], "names no module"),
])
def test_non_python_commands_are_rejected(argv, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        CommandJob(argv=argv, workdir=tmp_path)


def test_command_job_runs_in_process_and_reports_failure(tmp_path, monkeypatch):
    script = tmp_path / "job.py"
    script.write_text("import sys, pathlib\npathlib.Path('ran.txt').write_text(' '.join(sys.argv[1:]))\n"
                      "sys.exit(int(sys.argv[1]))\n")
    monkeypatch.chdir(tmp_path)
    assert CommandJob(argv=[sys.executable, "job.py", "0", "ok"], workdir=tmp_path)() == 0
    assert (tmp_path / "ran.txt").read_text() == "0 ok"
    with pytest.raises(RuntimeError, match="exited with status 4"):
        CommandJob(argv=[sys.executable, "job.py", "4"], workdir=tmp_path)()
    # `python -m module` form, with the module found in the workdir like `python -m` would.
    (tmp_path / "dinov2_toy_entry.py").write_text(
        "import sys, pathlib\nif __name__ == '__main__':\n    pathlib.Path('mod.txt').write_text(sys.argv[1])\n")
    assert CommandJob(argv=[sys.executable, "-u", "-m", "dinov2_toy_entry", "hello"], workdir=tmp_path)() == 0
    assert (tmp_path / "mod.txt").read_text() == "hello"
    assert str(tmp_path) not in sys.path  # sys.path and sys.argv are restored


def test_checkpoint_resubmits_resume_command_until_max_requeues(tmp_path, monkeypatch):
    import submitit

    job = CommandJob(argv=[sys.executable, "-m", "m", "--fresh"], resume_argv=[sys.executable, "-m", "m", "--resume"],
                     workdir=tmp_path, max_requeues=2)
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    delayed = job.checkpoint()
    assert isinstance(delayed, submitit.helpers.DelayedSubmission)
    assert isinstance(delayed.function, CommandJob) and delayed.function.argv[-1] == "--resume"
    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")
    assert job.checkpoint() is None


# --------------------------------------------------------------------------- real cluster
def _cluster_problem() -> str | None:
    if shutil.which("sinfo") is None or shutil.which("sbatch") is None:
        return "Slurm client commands (sinfo/sbatch) are not installed"
    result = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=30)
    states = result.stdout.split()
    if result.returncode != 0:
        return f"sinfo failed: {result.stderr.strip()}"
    if not any(s.rstrip("*~#") in ("idle", "mixed", "allocated", "completing") for s in states):
        return f"no usable Slurm node (states: {states or 'none'})"
    return None


@pytest.fixture(scope="module")
def slurm_cluster():
    problem = _cluster_problem()
    if problem is None:
        return
    if os.environ.get("DINOV2_NO_SLURM"):
        pytest.skip(f"DINOV2_NO_SLURM set; {problem}")
    required = os.environ.get("DINOV2_REQUIRE_SLURM") == "1" or os.environ.get("CI", "").lower() in ("1", "true")
    message = f"{problem}; start it with `bash launch/local_slurm/start_cluster.sh` (as root)"
    if required:
        pytest.fail(f"Slurm cluster required (CI / DINOV2_REQUIRE_SLURM) but unusable: {message}")
    pytest.skip(message)


def _options(tmp_path: Path) -> LauncherOptions:
    # timeout well above 10 min: submitit treats a signal in the last 10 min as a timeout, not a preemption.
    return LauncherOptions(launcher="slurm", nproc=2, timeout_min=20, mem_gb=2.0, signal_delay_s=30,
                           max_requeues=2, job_name="dinov2_repro_test", slurm_output_dir=str(tmp_path / "slurm/%j"))


def _wait_done(job, timeout_s: float) -> None:
    """Wait for all tasks' results; fail early (with logs) if Slurm ended the job without them."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if job.done():
            return
        state = slurm_job_info(job.job_id).get("JobState", "")
        if state in ("FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"):
            time.sleep(2)  # let the result files land
            if job.done():
                return
            pytest.fail(f"Slurm job {job.job_id} ended in state {state}:\n{job.stdout()}\n{job.stderr()}")
        time.sleep(0.5)
    subprocess.run(["scancel", str(job.job_id)], check=False)
    pytest.fail(f"Slurm job {job.job_id} not done after {timeout_s}s "
                f"(state {slurm_job_info(job.job_id).get('JobState')}):\n{job.stdout()}\n{job.stderr()}")


def _submit_toy(tmp_path: Path, iters: int, sleep: float):
    (tmp_path / "toy_train.py").write_text(TOY_TRAIN)
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "toy_train.py", "--output-dir", str(out), "--iters", str(iters), "--sleep", str(sleep)]
    return submit_slurm(argv, _options(tmp_path), workdir=tmp_path), out


def _events(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]


@pytest.mark.timeout(120)
def test_two_task_job_runs_to_completion(slurm_cluster, tmp_path):
    job, out = _submit_toy(tmp_path, iters=6, sleep=0.0)
    _wait_done(job, timeout_s=90)
    assert job.results() == [0, 0]
    assert slurm_job_info(job.job_id).get("Restarts") == "0"
    events = _events(out)
    assert events == [{"restart_count": 0, "start_iteration": 0, "world_size": 2, "source": "slurm", "omp": "1"}]
    final = torch.load(out / "checkpoints" / "last")
    assert final["iteration"] == 6
    assert torch.equal(final["x"], reference_state(6))


def preempt(job, *, timeout_s: float = 30.0) -> None:
    """What Slurm does on preemption: SIGTERM to every task, then the job's signal (USR2).

    submitit's ``job._interrupt()`` sends the two back to back, and Slurm delivers them
    asynchronously: a SIGTERM that lands late kills the ``scontrol requeue`` the USR2 handler has
    just started (seen under load). So USR2 goes only once every task has logged the SIGTERM."""
    from submitit.slurm.slurm import SlurmJobEnvironment

    tasks = job._sub_jobs or [job]
    subprocess.check_call(["scancel", job.job_id, "--signal", "SIGTERM"])
    deadline = time.monotonic() + timeout_s
    while not all("Bypassing signal SIGTERM" in (task.stderr() or "") for task in tasks):
        assert time.monotonic() < deadline, f"SIGTERM not seen by every task after {timeout_s} s:\n{job.stderr()}"
        time.sleep(0.1)
    subprocess.check_call(["scancel", job.job_id, "--signal", SlurmJobEnvironment.USR_SIG])


@pytest.mark.timeout(180)
def test_preempted_job_is_requeued_and_resumes_from_last_checkpoint(slurm_cluster, tmp_path):
    iters = 20
    job, out = _submit_toy(tmp_path, iters=iters, sleep=0.25)
    last = out / "checkpoints" / "last"
    deadline = time.monotonic() + 90
    seen = 0
    while seen < 3:
        assert time.monotonic() < deadline, f"no checkpoint after 90 s:\n{job.stdout()}\n{job.stderr()}"
        if last.exists():
            seen = torch.load(last)["iteration"]
        time.sleep(0.2)
    preempt(job)
    _wait_done(job, timeout_s=150)
    assert job.results() == [0, 0]

    events = _events(out)
    assert [e["restart_count"] for e in events] == [0, 1], events
    assert events[0]["start_iteration"] == 0
    # Resumed from the checkpoint the first run left, not from scratch.
    assert seen <= events[1]["start_iteration"] < iters, events
    assert slurm_job_info(job.job_id).get("Restarts") == "1"  # Slurm's own count of requeues
    final = torch.load(last)
    assert final["iteration"] == iters
    assert torch.equal(final["x"], reference_state(iters))
    assert "requeueing (restart 1/2)" in job.stdout()
