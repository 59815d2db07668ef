import pytest
import yaml

from dinov2_repro.config import CONFIG_DIR, ConfigError, load_config, save_config


def test_defaults_then_experiment_then_overrides(tmp_path):
    cfg = load_config(CONFIG_DIR / "train" / "vitg14.yaml", ["train.batch_size_per_gpu=4", "optim.base_lr=1e-3"])
    assert cfg.student.arch == "vit_giant2"  # from the experiment file
    assert cfg.train.batch_size_per_gpu == 4  # the override wins over the experiment file (12)
    assert cfg.optim.base_lr == pytest.approx(1e-3)
    assert cfg.optim.adamw_beta2 == pytest.approx(0.999)  # untouched default
    path = save_config(cfg, tmp_path)
    assert yaml.safe_load(path.read_text())["train"]["batch_size_per_gpu"] == 4


def test_unknown_key_names_key_and_closest():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["train.batch_size_per_gpuu=3"])
    assert "train.batch_size_per_gpuu" in str(err.value)
    assert "train.batch_size_per_gpu" in str(err.value)


def test_unknown_key_in_experiment_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("student:\n  archh: vit_small\n")
    with pytest.raises(ConfigError, match=r"student\.archh.*student\.arch"):
        load_config(bad)


@pytest.mark.parametrize("override", ["train.batch_size_per_gpu=abc", "ibot.separate_head=3", "crops.global_crops_scale=0.5",
                                      "student.arch=5"])
def test_wrong_type_is_an_error(override):
    with pytest.raises(ConfigError, match=override.split("=")[0]):
        load_config(None, [override])


def test_int_accepted_for_float_and_malformed_override():
    assert load_config(None, ["optim.clip_grad=1"]).optim.clip_grad == 1
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["optim.clip_grad"])


def test_every_shipped_recipe_validates():
    recipes = sorted((CONFIG_DIR / "train").glob("*.yaml"))
    assert len(recipes) >= 5
    for recipe in recipes:
        load_config(recipe)


@pytest.mark.parametrize("override", ["compute_precision.grad_scaler=true", "student.pretrained_weights=w.pth",
                                      "optim.lr=0.001"])
def test_reference_keys_this_project_does_not_read_are_rejected_with_the_alternative(override, tmp_path):
    """Keys that would be accepted and silently ignored (or overwritten) are errors naming what to set instead."""
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=rf"{key}.*(param_dtype=fp16|MODEL\.WEIGHTS|optim\.base_lr)"):
        load_config(None, [override])
    section, name = key.split(".")
    path = tmp_path / "recipe.yaml"
    path.write_text(f"{section}:\n  {name}: 1\n")
    with pytest.raises(ConfigError, match=rf"recipe\.yaml.*{key}"):
        load_config(path)
