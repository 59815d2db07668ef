"""Capacity planning without a GPU: ``trace.py`` runs a real training step on fake tensors
(FLOPs per part, live memory); ``report.py`` turns it into per-GPU memory, fit and remedies,
step time and GPU-hours; ``cli.py`` is the ``dinov2-repro plan`` verb. Import the submodules
(this package stays import-light so the CLI starts fast)."""
