"""Capacity planning without a GPU: ``trace.py`` runs a real training step on fake tensors
(FLOPs per part, live memory); ``report.py`` turns it into per-GPU memory, fit and remedies,
step time and GPU-hours; ``cli.py`` is the ``dinov2-repro plan`` verb. Import the submodules
(this package stays import-light so the CLI starts fast)."""
from dinov2_repro.callable_package import make_package_callable

# ``dinov2_repro.plan(config, ...)`` is dinov2_repro.api.plan.
make_package_callable(__name__, "plan")
