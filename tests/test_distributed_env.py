"""detect_env for each source, backend choice, single-process init and per-rank logging."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from dinov2_repro.distributed import env as denv
from dinov2_repro.distributed import (
    barrier,
    choose_backend,
    detect_env,
    get_rank,
    get_world_size,
    init_distributed,
    is_main_process,
    parse_nodelist,
    setup_rank_logging,
    shutdown_distributed,
)

SLURM_TASK = {
    "SLURM_JOB_ID": "4321",
    "SLURM_PROCID": "5",
    "SLURM_NTASKS": "8",
    "SLURM_LOCALID": "1",
    "SLURM_NODEID": "1",
    "SLURM_JOB_NUM_NODES": "2",
    "SLURM_TASKS_PER_NODE": "4(x2)",
    "SLURM_JOB_NODELIST": "gpu[07-08]",
}


@pytest.mark.parametrize("nodelist, expected", [
    ("node[01-04]", ["node01", "node02", "node03", "node04"]),
    ("vm", ["vm"]),
    ("a[1,3-4],b7", ["a1", "a3", "a4", "b7"]),
    ("gpu[08-11]", ["gpu08", "gpu09", "gpu10", "gpu11"]),
    ("rack[1-2]-n[5-6]", ["rack1-n5", "rack1-n6", "rack2-n5", "rack2-n6"]),
    ("login,c-[9-10]", ["login", "c-9", "c-10"]),
])
def test_parse_nodelist_forms(nodelist, expected):
    assert parse_nodelist(nodelist) == expected


@pytest.mark.parametrize("bad", ["node[01-04", "node]1[", "n[a-b]", "n[5-2]", ""])
def test_parse_nodelist_rejects_malformed(bad):
    with pytest.raises(ValueError, match="node list"):
        parse_nodelist(bad)


def test_slurm_layout_from_tasks_per_node():
    env = detect_env(SLURM_TASK)
    assert (env.source, env.rank, env.world_size, env.local_rank, env.local_world_size) == ("slurm", 5, 8, 1, 4)
    assert env.master_addr == "gpu07"
    # Every task derives the same port from the job id; a different job gets another one.
    assert env.master_port == detect_env({**SLURM_TASK, "SLURM_PROCID": "0", "SLURM_LOCALID": "0"}).master_port
    assert env.master_port != detect_env({**SLURM_TASK, "SLURM_JOB_ID": "4322"}).master_port
    assert 1024 < env.master_port < 32768


def test_slurm_uneven_tasks_per_node_and_explicit_ntasks_per_node():
    uneven = {**SLURM_TASK, "SLURM_NTASKS": "7", "SLURM_TASKS_PER_NODE": "4,3", "SLURM_PROCID": "6",
              "SLURM_LOCALID": "2"}
    assert detect_env(uneven).local_world_size == 3
    explicit = {**SLURM_TASK, "SLURM_NTASKS_PER_NODE": "4", "SLURM_TASKS_PER_NODE": "garbage"}
    assert detect_env(explicit).local_world_size == 4


def test_slurm_step_nodelist_wins_over_job_nodelist():
    env = detect_env({**SLURM_TASK, "SLURM_STEP_NODELIST": "gpu08", "SLURM_JOB_NODELIST": "gpu[07-08]"})
    assert env.master_addr == "gpu08"


def test_torchrun_variables():
    env = detect_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
                      "MASTER_ADDR": "10.0.0.2", "MASTER_PORT": "29512"})
    assert env == denv.DistributedEnv(rank=3, world_size=4, local_rank=1, local_world_size=2,
                                      master_addr="10.0.0.2", master_port=29512, source="torchrun")


def test_single_process_when_nothing_is_set():
    env = detect_env({})
    assert (env.source, env.rank, env.world_size, env.local_rank) == ("single", 0, 1, 0)


def test_torchrun_inside_single_task_slurm_job_uses_torchrun():
    environ = {**SLURM_TASK, "SLURM_NTASKS": "1", "SLURM_PROCID": "0", "SLURM_LOCALID": "0",
               "SLURM_TASKS_PER_NODE": "1", "RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1",
               "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29400"}
    env = detect_env(environ)
    assert (env.source, env.rank, env.world_size, env.master_port) == ("torchrun", 1, 2, 29400)


def test_leftover_torchrun_variables_in_multitask_slurm_step_are_ignored():
    environ = {**SLURM_TASK, "RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}
    assert detect_env(environ).source == "slurm"
    # ... unless a launcher inside the task says it set them.
    assert detect_env({**environ, "TORCHELASTIC_RUN_ID": "x"}).source == "torchrun"
    assert detect_env({**environ, "DINOV2_LAUNCHER": "local"}).source == "torchrun"


@pytest.mark.parametrize("environ, message", [
    ({**SLURM_TASK, "SLURM_PROCID": "x"}, "SLURM_PROCID='x'"),
    ({**SLURM_TASK, "SLURM_PROCID": "8"}, "rank=8 world_size=8"),
    ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_PORT": "29500"}, "MASTER_ADDR"),
    ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "h"}, "MASTER_PORT"),
    ({**SLURM_TASK, "SLURM_TASKS_PER_NODE": "4(y2)"}, "SLURM_TASKS_PER_NODE"),
])
def test_bad_environment_names_the_variable(environ, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
        detect_env(environ)


def test_backend_choice():
    assert choose_backend(cuda_available=True) == "nccl"
    assert choose_backend(cuda_available=False) == "gloo"


def test_single_process_init_without_and_with_process_group(monkeypatch):
    # setenv first so that undo also removes what init_distributed exports into os.environ.
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.setenv(key, "0")
        monkeypatch.delenv(key)
    shutdown_distributed()
    try:
        env = init_distributed()
        assert env.source == "single" and not torch.distributed.is_initialized()
        assert (get_rank(), get_world_size(), is_main_process()) == (0, 1, True)
        barrier()  # no-op without a group
        assert init_distributed() is env  # idempotent
        shutdown_distributed()
        env = init_distributed(force_process_group=True, backend="gloo")
        assert torch.distributed.is_initialized() and torch.distributed.get_backend() == "gloo"
        assert env.master_port > 0  # a free port was picked for the one-rank group
        tensor = torch.ones(3)
        torch.distributed.all_reduce(tensor)
        assert tensor.tolist() == [1.0, 1.0, 1.0]
        barrier()
    finally:
        shutdown_distributed()
    assert not torch.distributed.is_initialized()


def test_rank_logging_console_only_on_rank_zero(tmp_path, capsys):
    log1 = setup_rank_logging(tmp_path, 1, name="dinov2_test_rank_logging")
    log1.info("message from rank one")
    assert capsys.readouterr().out == ""
    assert "message from rank one" in (tmp_path / "logs" / "rank1.log").read_text()

    log0 = setup_rank_logging(tmp_path, 0, name="dinov2_test_rank_logging")  # replaces rank 1's handlers
    log0.info("message from rank zero")
    assert "message from rank zero" in capsys.readouterr().out
    assert "message from rank zero" in (tmp_path / "logs" / "rank0.log").read_text()
    assert "message from rank zero" not in (tmp_path / "logs" / "rank1.log").read_text()
    assert sum(isinstance(h, logging.FileHandler) for h in log0.handlers) == 1
    for handler in list(log0.handlers):
        log0.removeHandler(handler)
        handler.close()


def test_single_process_runs_leave_the_environment_as_they_found_it(monkeypatch):
    """A run in this process must not make later runs (or their children) look like torchrun ranks:
    exported RANK/WORLD_SIZE/MASTER_PORT once turned the next run into a gloo group bound to a
    stale port (EADDRINUSE in its children, a hang in a forked DataLoader worker)."""
    import os

    from dinov2_repro.distributed import init_distributed, shutdown_distributed

    keys = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    for key in keys:
        monkeypatch.delenv(key, raising=False)
    shutdown_distributed()
    init_distributed(backend="gloo")  # world size 1, no group: nothing to export
    assert not any(key in os.environ for key in keys)
    shutdown_distributed()
    env = init_distributed(backend="gloo", force_process_group=True)
    assert os.environ["MASTER_PORT"] == str(env.master_port) and env.world_size == 1
    shutdown_distributed()
    assert not any(key in os.environ for key in keys)


def test_only_shutdown_distributed_destroys_a_real_process_group():
    """A gloo rank that destroys its group while a peer still talks to it kills the peer with
    SIGABRT (the flaky distributed tests of stops 16-17). shutdown_distributed() puts a barrier
    first; every test worker and every module must leave a real group through it. The planner's
    one-process fake group is the only exception."""
    root = Path(__file__).resolve().parents[1]
    allowed = {root / "dinov2_repro" / "distributed" / "env.py", root / "dinov2_repro" / "plan" / "trace.py",
               Path(__file__).resolve()}
    offenders = []
    for folder in ("tests", "dinov2_repro", "distill", "launch", "data_curation", "benchmarks"):
        for path in (root / folder).rglob("*.py"):
            if path.resolve() not in allowed and ".destroy_process_group(" in path.read_text():
                offenders.append(str(path.relative_to(root)))
    assert not offenders, f"use dinov2_repro.distributed.shutdown_distributed() instead in: {offenders}"
