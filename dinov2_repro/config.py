"""Configuration: defaults YAML, then an experiment YAML, then ``key=value`` overrides.

Every key must exist in ``configs/ssl_default_config.yaml`` (an unknown key is an error that
names it and the closest known keys), and every value must have the default's type
(ints are accepted where floats are expected). The resolved config is written next to the
outputs as ``config.yaml``.
"""
from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import yaml
from omegaconf import DictConfig, OmegaConf

from .io.files import atomic_write_text  # noqa: F401  (importable from here: older callers use this path)

# The recipes ship inside the package (dinov2_repro/configs is the repository's configs/ folder,
# linked in a source checkout and copied into a wheel), so they are found the same way in both.
CONFIG_DIR = Path(__file__).resolve().parent / "configs"
DEFAULTS_PATH = CONFIG_DIR / "ssl_default_config.yaml"


class ConfigError(ValueError):
    """A config file or override names an unknown key or gives a value of the wrong type."""


# Keys of the reference recipe that this project does not read: naming one is an error that says
# what to do instead, rather than a setting that is accepted and silently has no effect.
UNSUPPORTED_KEYS: dict[str, str] = {
    "compute_precision.grad_scaler": "is not a setting here: a GradScaler is used exactly when "
                                     "compute_precision.param_dtype=fp16 (CUDA only); remove the key",
    "student.pretrained_weights": "is not supported; to start from another run's weights set MODEL.WEIGHTS "
                                  "(a pretraining run directory or checkpoint); remove the key",
    "optim.lr": "is derived, not set: the peak lr is optim.base_lr scaled to the global batch by "
                "optim.scaling_rule (none keeps base_lr); set those instead and remove the key",
}


def flatten_keys(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mapping to ``{"a.b.c": value}``; lists and empty mappings stay values."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten_keys(value, path + "."))
        else:
            flat[path] = value
    return flat


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _compatible(default: Any, value: Any) -> bool:
    if default is None or value is None:
        return True
    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(default, bool) and isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float))
    if isinstance(default, int):
        return isinstance(value, int)
    if isinstance(default, (list, tuple)):
        return isinstance(value, (list, tuple))
    if isinstance(default, Mapping):
        return isinstance(value, Mapping)
    return isinstance(value, type(default))


def validate_against(defaults: Mapping[str, Any], update: Mapping[str, Any], source: str) -> None:
    """Raise ConfigError if ``update`` has a key not in ``defaults`` or a value of another type."""
    known = flatten_keys(defaults)
    known_prefixes = {k.rsplit(".", i)[0] for k in known for i in range(1, k.count(".") + 1)}
    for key, value in flatten_keys(update).items():
        if key in UNSUPPORTED_KEYS:
            raise ConfigError(f"{source}: config key {key!r} {UNSUPPORTED_KEYS[key]}")
        if key in known:
            if not _compatible(known[key], value):
                raise ConfigError(
                    f"{source}: key {key!r} expects {_type_name(known[key])} (default {known[key]!r}), "
                    f"got {_type_name(value)} {value!r}"
                )
            continue
        if key in known_prefixes and (value is None or value == {}):
            continue
        close = difflib.get_close_matches(key, list(known), n=3, cutoff=0.5)
        hint = f"; closest known keys: {', '.join(close)}" if close else ""
        raise ConfigError(f"{source}: unknown config key {key!r}{hint}")


def _float_or_str(value: str) -> float | str:
    # YAML 1.1 reads "1e-3" (no dot) as a string; on the command line it means a float.
    try:
        return float(value) if any(c.isdigit() for c in value) and value.strip().lower() not in ("nan", "inf") else value
    except ValueError:
        return value


def parse_overrides(overrides: Iterable[str]) -> dict[str, Any]:
    """``a.b=1`` strings to a nested dict; values are parsed as YAML scalars/lists."""
    nested: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
            if isinstance(value, str):
                value = _float_or_str(value)
        except yaml.YAMLError as err:
            raise ConfigError(f"override {item!r}: cannot parse value {raw!r}: {err}") from err
        node = nested
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} conflicts with an earlier override of {part!r}")
        node[parts[-1]] = value
    return nested


def resolve_config_file(value: str | os.PathLike | None, *, recipes: str) -> Path | None:
    """``--config-file`` as given: an existing path, or the name of a shipped recipe in
    ``configs/<recipes>/`` (``vit_tiny_cpu.yaml`` or ``vit_tiny_cpu``). None stays None."""
    if value is None:
        return None
    path = Path(value)
    if path.is_file():
        return path
    folder = CONFIG_DIR / recipes
    for candidate in (folder / path.name, folder / f"{path.name}.yaml"):
        if path.parent == Path(".") and candidate.is_file():
            return candidate
    shipped = sorted(p.stem for p in folder.glob("*.yaml"))
    raise ConfigError(f"config file {str(value)!r} does not exist; give a path to a YAML file or one of the "
                      f"shipped {recipes} recipes: {', '.join(shipped)}")


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {err}") from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping at the top level")
    return data


def load_config(
    config_file: str | os.PathLike | None = None,
    overrides: Sequence[str] = (),
    *,
    defaults_file: str | os.PathLike | Sequence[str | os.PathLike] = DEFAULTS_PATH,
) -> DictConfig:
    """Merge defaults, the experiment YAML and overrides; validate every key and type.

    Several ``defaults_file`` paths add their top-level sections together (distillation:
    the SSL defaults plus its own ``distill:`` section)."""
    paths = [defaults_file] if isinstance(defaults_file, (str, os.PathLike)) else list(defaults_file)
    defaults: dict[str, Any] = {}
    for path in paths:
        defaults.update(_read_yaml(Path(path)))
    merged = OmegaConf.create(defaults)
    if config_file:
        experiment = _read_yaml(Path(config_file))
        validate_against(defaults, experiment, f"config file {str(config_file)!r}")
        merged = OmegaConf.merge(merged, OmegaConf.create(experiment))
    if overrides:
        update = parse_overrides(overrides)
        validate_against(defaults, update, "command-line override")
        merged = OmegaConf.merge(merged, OmegaConf.create(update))
    return merged


def save_config(cfg: DictConfig, output_dir: str | os.PathLike) -> Path:
    """Write the resolved config as ``<output_dir>/config.yaml``."""
    path = Path(output_dir) / "config.yaml"
    atomic_write_text(path, OmegaConf.to_yaml(cfg, resolve=True))
    return path
