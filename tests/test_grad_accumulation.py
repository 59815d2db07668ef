"""Gradient accumulation (train.grad_accumulation) through the real training loop: 1 rank x 2
micro-batches per step trains exactly (bit for bit, fp32) what 2 gloo ranks x 1 batch do, over
several optimizer steps: weights, teacher EMA, softmax centres.

Reuses the 2-rank test's config and batches (tests/test_distributed_train.py) with softmax
centering (its EMA is updated once per step from every micro-batch's rows, as from every rank's)
and KoLeo on (per batch of batch_size_per_gpu images: a rank's or a micro-batch's). Both arms run under FSDP2 (a process group of 1 or 2 ranks), as `dinov2-repro train` does under
a launcher. Gradient clipping is off (optim.clip_grad=0): with it on, the 2-rank gradient norm
sums per-shard norms, in another order than the 1-rank norm, so the clip coefficient differs in
the last bit (measured: weights then differ by up to 2e-5 after 3 steps, against Adam moves of
4e-3; the arms are otherwise identical). Sinkhorn-Knopp normalises over the global batch of one forward, so with accumulation
it normalises per micro-batch: not covered here, and documented as the difference it is."""
from __future__ import annotations

import os

import pytest
import torch
import torch.multiprocessing as mp

from dinov2_repro.distributed.env import find_free_port
from test_distributed_train import _batch, _cfg

pytestmark = pytest.mark.slow  # 3 spawned gloo processes

STEPS = 2


def _run(rank: int, world_size: int, port: int, out_dir: str) -> None:
    from dinov2_repro.train.loop import train
    from dinov2_repro.train.meta_arch import SSLMetaArch
    from dinov2_repro.distributed.fsdp import wrap_meta_arch_if_distributed

    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    accumulation = 2 // world_size
    cfg = _cfg("centering")
    for key, value in {"train.output_dir": out_dir, "train.grad_accumulation": accumulation, "train.max_iterations": STEPS,
                       "train.OFFICIAL_EPOCH_LENGTH": STEPS, "optim.epochs": 1, "optim.warmup_epochs": 0,
                       "optim.scaling_rule": "none", "train.tensorboard": False, "train.device": "cpu",
                       "train.checkpoint_period_iterations": STEPS, "dino.koleo_loss_weight": 0.1, "optim.clip_grad": 0.0}.items():
        section, name = key.split(".")
        cfg[section][name] = value

    def build_meta_arch(cfg):
        torch.manual_seed(0)  # the same init on every rank and in both runs
        return SSLMetaArch(cfg)

    def build_data(cfg, start_iteration, env):
        # Rank r's batch is images 2r, 2r+1; the accumulating rank takes both halves in turn.
        halves = [slice(0, 2), slice(2, 4)]
        while True:
            for half in halves[rank::world_size]:
                yield _batch(half)

    train(cfg, build_meta_arch=build_meta_arch, build_data=build_data, wrap_model=wrap_meta_arch_if_distributed)


def _state(run_dir=None):
    from dinov2_repro.train.checkpoint import last_checkpoint, load_model_state
    from dinov2_repro.train.meta_arch import SSLMetaArch

    torch.manual_seed(0)
    model = SSLMetaArch(_cfg("centering"))
    if run_dir is not None:
        load_model_state(last_checkpoint(run_dir), model)
    return model.state_dict()


def test_one_rank_two_micro_batches_equals_two_ranks(tmp_path):
    two, one = tmp_path / "two_ranks", tmp_path / "one_rank_accumulating"
    # Both runs at once (3 processes): most of their time is spawning and importing.
    ranks = mp.start_processes(_run, args=(2, find_free_port(), str(two)), nprocs=2, start_method="spawn", join=False)
    mp.start_processes(_run, args=(1, find_free_port(), str(one)), nprocs=1, start_method="spawn")
    while not ranks.join():
        pass
    a, b, initial = _state(two), _state(one), _state()
    assert a.keys() == b.keys()
    different = [key for key in a if not torch.equal(a[key], b[key])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"
    # Training happened: the weights moved from the init and the centre from 0.
    assert not torch.equal(a["student.backbone.blocks.0.attn.qkv.weight"], initial["student.backbone.blocks.0.attn.qkv.weight"])
    assert a["dino_center.center"].abs().sum() > 0
