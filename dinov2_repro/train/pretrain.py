"""Builders that turn a config into the SSL run's pieces (data stream, meta-arch, export),
then hand them to the generic loop."""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Iterator

from omegaconf import DictConfig
from torch import nn

from ..data import DataAugmentationDINO, MaskingGenerator, build_dataset, collate_data_and_cast, make_data_loader
from ..distributed import DistributedEnv
from ..distributed.fsdp import full_state_dict
from ..backbone_file import save_backbone
from .initialize import init_from_pretrained
from .loop import train
from .meta_arch import SSLMetaArch, build_backbone

TEACHER_EXPORT = Path("export") / "teacher_backbone.safetensors"


def build_ssl_transform(cfg: DictConfig) -> DataAugmentationDINO:
    crops = cfg.crops
    if len(crops.mean) != cfg.student.in_chans or len(crops.std) != cfg.student.in_chans:
        raise ValueError(
            f"crops.mean/crops.std have {len(crops.mean)}/{len(crops.std)} entries but student.in_chans is "
            f"{cfg.student.in_chans}: give one value per band"
        )
    return DataAugmentationDINO(
        global_crops_scale=tuple(crops.global_crops_scale), local_crops_scale=tuple(crops.local_crops_scale),
        local_crops_number=crops.local_crops_number, global_crops_size=crops.global_crops_size,
        local_crops_size=crops.local_crops_size, blur_rates=crops.blur_rates,
        preset=crops.preset, mean=tuple(crops.mean), std=tuple(crops.std),
    )


def _build_train_dataset(spec: str):
    """The dataset of ``train.dataset_path``; a bad spec or a missing path becomes a ConfigError
    naming the key (the CLI prints it as one line)."""
    from ..config import ConfigError

    try:
        return build_dataset(spec)
    except (FileNotFoundError, NotADirectoryError, ValueError) as err:
        raise ConfigError(f"train.dataset_path={spec!r}: {err}. Point train.dataset_path at existing data "
                          f"(e.g. Sample:tile=56 for the images shipped with the install)") from err


def build_ssl_data(cfg: DictConfig, start_iteration: int, env: DistributedEnv) -> Iterator[dict[str, Any]]:
    patch = cfg.student.patch_size
    if cfg.crops.global_crops_size % patch or cfg.crops.local_crops_size % patch:
        raise ValueError(
            f"crops.global_crops_size={cfg.crops.global_crops_size} and crops.local_crops_size="
            f"{cfg.crops.local_crops_size} must be multiples of student.patch_size={patch}"
        )
    grid = cfg.crops.global_crops_size // patch
    mask_generator = MaskingGenerator(input_size=(grid, grid), max_num_patches=int(0.5 * grid * grid),
                                      min_num_patches=cfg.ibot.mask_min_block_patches)
    collate = functools.partial(
        collate_data_and_cast, mask_ratio_tuple=tuple(cfg.ibot.mask_ratio_min_max),
        mask_probability=cfg.ibot.mask_sample_probability, n_tokens=grid * grid, mask_generator=mask_generator,
    )
    batch_size = cfg.train.batch_size_per_gpu
    loader = make_data_loader(
        dataset=_build_train_dataset(cfg.train.dataset_path), transform=build_ssl_transform(cfg), collate_fn=collate,
        batch_size=batch_size, num_workers=cfg.train.num_workers, seed=cfg.train.seed, rank=env.rank,
        world_size=env.world_size, start_sample=start_iteration * batch_size * int(cfg.train.grad_accumulation),
    )
    return iter(loader)


def export_teacher(backbone: nn.Module, run_dir: Path, cfg: DictConfig, env: DistributedEnv) -> Path:
    """Collective: gathers the (possibly sharded) teacher backbone; rank 0 writes the file."""
    path = Path(run_dir) / TEACHER_EXPORT
    state = full_state_dict(backbone)
    if env.rank == 0:
        plain = build_backbone(cfg.student, img_size=cfg.crops.global_crops_size, drop_path_rate=0.0)
        plain.load_state_dict(state)
        save_backbone(plain, path, arch=cfg.student.arch, mean=tuple(cfg.crops.mean), std=tuple(cfg.crops.std))
    return path


def build_ssl_meta_arch(cfg: DictConfig) -> SSLMetaArch:
    """The meta-arch, initialised from ``MODEL.WEIGHTS`` when set (a resumed run then loads its
    own checkpoint over it)."""
    model = SSLMetaArch(cfg)
    if cfg.MODEL.WEIGHTS:
        init_from_pretrained(model, cfg.MODEL.WEIGHTS)
    return model


def run_ssl_training(cfg: DictConfig) -> dict[str, float]:
    from ..distributed.fsdp import wrap_meta_arch_if_distributed
    from .validate import validate_train_config

    validate_train_config(cfg)  # before any model, process group or worker exists
    return train(cfg, build_meta_arch=build_ssl_meta_arch, build_data=build_ssl_data, export=export_teacher,
                 wrap_model=wrap_meta_arch_if_distributed)
