"""SSL pretraining: meta-architecture, generic loop, optimiser, schedules, checkpoints.

Calling the package is the API: ``dinov2_repro.train(config, overrides, launcher=...)`` is
:func:`dinov2_repro.api.train`."""
from dinov2_repro.callable_package import make_package_callable

make_package_callable(__name__, "train")
