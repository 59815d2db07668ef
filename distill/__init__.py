"""Distillation of a pretrained (frozen) teacher into one or more smaller students through the
generic training loop. API: ``cfg = load_distill_config(config_file, overrides, teacher=...)``,
``run_distillation(cfg)``; CLI: ``dinov2-repro distill``."""
from dinov2_repro.callable_package import make_package_callable

from .config import load_distill_config, student_specs
from .meta_arch import DistillMetaArch
from .run import run_distillation, student_export_path

__all__ = ["DistillMetaArch", "load_distill_config", "run_distillation", "student_export_path", "student_specs"]

# ``dinov2_repro.distill(config, overrides, teacher=...)`` is dinov2_repro.api.distill.
make_package_callable(__name__, "distill")
