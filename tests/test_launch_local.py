"""run_local: real 2-rank gloo jobs, failure propagation and killed ranks; launcher options."""
from __future__ import annotations

import argparse
import io
import json
import os
import sys
import textwrap
import time

import pytest

from dinov2_repro.launch.local import exit_code_of, run_local
from dinov2_repro.launch.options import LauncherOptions, add_launcher_arguments, options_from_args

ALL_REDUCE_SCRIPT = textwrap.dedent("""
    import json, os, sys
    import torch
    import torch.distributed as dist
    from dinov2_repro.distributed import init_distributed, shutdown_distributed

    env = init_distributed(backend="gloo", timeout_s=60)
    value = torch.tensor([float(env.rank + 1), 10.0 * (env.rank + 1)])
    dist.all_reduce(value)
    out = {"rank": env.rank, "world_size": env.world_size, "source": env.source,
           "sum": value.tolist(), "backend": dist.get_backend(), "omp": os.environ.get("OMP_NUM_THREADS")}
    with open(os.path.join(sys.argv[1], f"rank{env.rank}.json"), "w") as f:
        json.dump(out, f)
    print("done rank", env.rank)
    shutdown_distributed()
""")

# Rank 1 fails (or is killed) right away; rank 0 would sleep forever and must be stopped.
FAILING_SCRIPT = textwrap.dedent("""
    import os, signal, sys, time
    rank = int(os.environ["RANK"])
    pid_file = os.path.join(sys.argv[2], "rank0.pid")
    if rank == 1:
        deadline = time.monotonic() + 30
        while not os.path.exists(pid_file) and time.monotonic() < deadline:
            time.sleep(0.05)  # fail only once the sibling really runs
        if sys.argv[1] == "exit":
            sys.exit(3)
        os.kill(os.getpid(), signal.SIGKILL)
    with open(pid_file + ".tmp", "w") as f:
        f.write(str(os.getpid()))
    os.replace(pid_file + ".tmp", pid_file)
    time.sleep(3600)
""")


def assert_not_running(pid_file):
    pid = int(pid_file.read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


@pytest.mark.slow
def test_two_ranks_all_reduce_over_gloo(tmp_path):
    script = tmp_path / "all_reduce.py"
    script.write_text(ALL_REDUCE_SCRIPT)
    out = io.StringIO()
    code = run_local([sys.executable, str(script), str(tmp_path)], nproc=2, stream=out)
    assert code == 0, out.getvalue()
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for rank, result in enumerate(results):
        assert result["rank"] == rank and result["world_size"] == 2
        assert result["source"] == "torchrun" and result["backend"] == "gloo"
        assert result["sum"] == [3.0, 30.0]
        assert result["omp"] is not None
    assert "[rank 0] done rank 0" in out.getvalue() and "[rank 1] done rank 1" in out.getvalue()


def test_failing_rank_exit_code_is_returned_and_sibling_killed(tmp_path, capsys):
    script = tmp_path / "fail.py"
    script.write_text(FAILING_SCRIPT)
    start = time.monotonic()
    code = run_local([sys.executable, str(script), "exit", str(tmp_path)], nproc=2, stream=io.StringIO(),
                     terminate_grace_s=5)
    elapsed = time.monotonic() - start
    assert code == 3
    assert elapsed < 15, f"sibling was not stopped quickly ({elapsed:.1f}s)"
    assert_not_running(tmp_path / "rank0.pid")
    assert "rank 1" in capsys.readouterr().err


def test_killed_rank_is_reported_with_signal(tmp_path, capsys):
    script = tmp_path / "fail.py"
    script.write_text(FAILING_SCRIPT)
    code = run_local([sys.executable, str(script), "kill", str(tmp_path)], nproc=2, stream=io.StringIO(),
                     terminate_grace_s=5)
    assert code == exit_code_of(-9) == 137
    assert_not_running(tmp_path / "rank0.pid")
    err = capsys.readouterr().err
    assert "rank 1" in err and "SIGKILL" in err


def test_run_local_rejects_bad_arguments():
    with pytest.raises(ValueError, match="nproc=0"):
        run_local([sys.executable, "-c", "pass"], nproc=0)
    with pytest.raises(ValueError, match="empty command"):
        run_local([], nproc=1)
    with pytest.raises(RuntimeError, match="cannot start rank 0"):
        run_local(["/nonexistent/interpreter"], nproc=1)


def test_launcher_arguments_roundtrip():
    parser = add_launcher_arguments(argparse.ArgumentParser())
    args = parser.parse_args(["--launcher", "slurm", "--nodes", "2", "--gpus-per-node", "8", "--timeout", "90",
                              "--partition", "learn", "--mem-gb", "400", "--slurm-output-dir", "/shared/%j",
                              "--slurm-extra", "mail-type=END", "--slurm-extra", "exclusive=", "--max-requeues", "7"])
    options = options_from_args(args)
    assert options == LauncherOptions(launcher="slurm", nodes=2, gpus_per_node=8, timeout_min=90, partition="learn",
                                      mem_gb=400.0, slurm_output_dir="/shared/%j", max_requeues=7,
                                      extra_slurm={"mail-type": "END", "exclusive": True})
    assert options.tasks_per_node == 8 and options.world_size == 16
    cpu = options_from_args(parser.parse_args(["--launcher", "local", "--nproc", "3"]))
    assert cpu.tasks_per_node == 3 and cpu.world_size == 3


@pytest.mark.parametrize("kwargs, message", [
    ({"launcher": "mpi"}, "launcher='mpi'"),
    ({"nproc": 0}, "nproc=0"),
    ({"launcher": "local", "nodes": 2}, "nodes=2"),
    ({"launcher": "slurm", "timeout_min": 1, "signal_delay_s": 90}, "signal_delay_s=90"),
    ({"mem_gb": -1.0}, "mem_gb=-1.0"),
])
def test_bad_launcher_options_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LauncherOptions(**kwargs)


def test_options_from_args_needs_launcher_arguments():
    with pytest.raises(ValueError, match="add_launcher_arguments"):
        options_from_args(argparse.Namespace(foo=1))
    with pytest.raises(SystemExit):
        add_launcher_arguments(argparse.ArgumentParser()).parse_args(["--slurm-extra", "novalue"])
