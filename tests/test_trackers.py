"""Experiment trackers: metrics.jsonl always, TensorBoard, MLflow (a real local file store, no
server) and W&B (offline mode), for pretraining, distillation and segmentation. Every value is
read back from the tracker's own store: the MLflow client, the offline W&B run file."""
from __future__ import annotations

import json

import pytest
import torch

from dinov2_repro.cli import main as cli_main
from dinov2_repro.config import ConfigError, load_config
from dinov2_repro.train.metrics import read_metrics
from test_distill_backbone_teacher import features_cfg, teachers  # noqa: F401 (backbone teacher fixture)
from test_seg import geotiff_folder, tiny_backbone  # noqa: F401 (segmentation fixtures)
from test_train import _data_that_stops_after, _Interrupted, image_root, micro_cfg  # noqa: F401 (micro image folder)

mlflow = pytest.importorskip("mlflow")
wandb = pytest.importorskip("wandb")


@pytest.fixture(autouse=True)
def offline_wandb(tmp_path, monkeypatch):
    """W&B never goes online here, and writes under the test's folder."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_default"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)  # set by the tracker for a file: URI (MLflow 3)


def _mlflow_run(uri, run_id):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    return client, client.get_run(run_id)


def _history(client, run_id, key):
    return [(m.step, m.value) for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]


def _assert_series(got, expected):
    """Same steps, same values (to float rounding) of two [(step, value)] series."""
    assert [step for step, _ in got] == [step for step, _ in expected]
    assert [value for _, value in got] == pytest.approx([value for _, value in expected], rel=1e-6)


def _tracking_overrides(tmp_path, *loggers):
    return [f"train.loggers=[{','.join(loggers)}]", f"tracking.mlflow.tracking_uri=file:{tmp_path / 'mlruns'}",
            "tracking.mlflow.experiment=tests", "tracking.wandb.project=tests", "tracking.wandb.mode=offline",
            f"tracking.wandb.dir={tmp_path / 'wandb'}", "tracking.run_name=micro"]


# ---- pretraining -----------------------------------------------------------------------------------
def test_pretraining_logs_config_metrics_and_export_to_every_tracker(image_root, tmp_path, one_torch_thread):
    from dinov2_repro.tracking.wandb_offline import read_offline_run
    from dinov2_repro.train.pretrain import TEACHER_EXPORT, run_ssl_training

    run_dir = tmp_path / "run"
    cfg = micro_cfg(image_root, run_dir, "train.max_iterations=2", "train.tensorboard=true",
                    *_tracking_overrides(tmp_path, "tensorboard", "mlflow", "wandb"))
    run_ssl_training(cfg)
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert [row["iteration"] for row in rows] == [1, 2]
    export = str((run_dir / TEACHER_EXPORT).resolve())
    record = json.loads((run_dir / "trackers.json").read_text())
    assert record["export_paths"] == [export]
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))

    client, run = _mlflow_run(record["mlflow"]["tracking_uri"], record["mlflow"]["run_id"])
    assert record["mlflow"]["tracking_uri"] == f"file:{tmp_path / 'mlruns'}"  # the configured store, no server
    assert run.info.status == "FINISHED" and run.info.run_name == "micro"
    assert run.data.params["student.arch"] == "vit_micro" and run.data.params["train.max_iterations"] == "2"
    assert run.data.params["train.loggers"] == "['tensorboard', 'mlflow', 'wandb']"
    assert run.data.tags["export_path"] == export
    for key in ("total_loss", "lr", "grad_norm", "grad_norm/backbone"):  # "/" is "." in MLflow
        expected = [(r["iteration"], r[key]) for r in rows]
        _assert_series(_history(client, run.info.run_id, key.replace("/", ".")), expected)

    offline = read_offline_run(tmp_path / "wandb")
    assert offline["run_id"] == record["wandb"]["run_id"] and offline["project"] == "tests" and offline["name"] == "micro"
    assert offline["config"]["student"]["arch"] == "vit_micro" and offline["config"]["train"]["max_iterations"] == 2
    logged = [(h["_step"], h["total_loss"]) for h in offline["history"]]
    _assert_series(logged, [(r["iteration"], r["total_loss"]) for r in rows])
    assert offline["summary"]["export_path"] == export


def test_resumed_run_continues_its_mlflow_run(image_root, tmp_path, one_torch_thread):
    from dinov2_repro.train.pretrain import run_ssl_training

    run_dir = tmp_path / "run"
    common = ["train.checkpoint_period_iterations=1", *_tracking_overrides(tmp_path, "mlflow")]
    run_ssl_training(micro_cfg(image_root, run_dir, "train.max_iterations=1", *common))
    first = json.loads((run_dir / "trackers.json").read_text())["mlflow"]
    run_ssl_training(micro_cfg(image_root, run_dir, "train.max_iterations=2", *common))  # resumes at iteration 1
    second = json.loads((run_dir / "trackers.json").read_text())["mlflow"]
    assert second["run_id"] == first["run_id"]
    client, run = _mlflow_run(second["tracking_uri"], second["run_id"])
    assert [step for step, _ in _history(client, run.info.run_id, "total_loss")] == [1, 2]
    assert run.info.status == "FINISHED" and run.data.params["train.max_iterations"] == "1"  # MLflow keeps the first


def test_a_crashed_run_ends_failed_in_mlflow(image_root, tmp_path, one_torch_thread):
    from dinov2_repro.train.loop import train
    from dinov2_repro.train.meta_arch import SSLMetaArch

    run_dir = tmp_path / "run"
    cfg = micro_cfg(image_root, run_dir, "train.max_iterations=3", *_tracking_overrides(tmp_path, "mlflow"))
    with pytest.raises(_Interrupted):
        train(cfg, build_meta_arch=SSLMetaArch, build_data=_data_that_stops_after(1))
    record = json.loads((run_dir / "trackers.json").read_text())["mlflow"]
    client, run = _mlflow_run(record["tracking_uri"], record["run_id"])
    assert run.info.status == "FAILED" and [s for s, _ in _history(client, run.info.run_id, "total_loss")] == [1]


def test_rank_other_than_zero_opens_no_tracker(tmp_path):
    from dinov2_repro.tracking import TrackingSettings, open_trackers

    settings = TrackingSettings(loggers=("jsonl", "mlflow"), run_dir=tmp_path)
    trackers = open_trackers(settings, config={"a": 1}, enabled=False)
    trackers.log_metrics({"iteration": 1, "loss": 1.0})
    trackers.close()
    assert trackers.names == [] and not list(tmp_path.iterdir())


# ---- distillation ----------------------------------------------------------------------------------
def test_distillation_logs_to_mlflow_with_the_student_export(teachers, image_root, tmp_path, one_torch_thread):
    from dinov2_repro.distill import run_distillation, student_export_path

    run_dir = tmp_path / "distill"
    cfg = features_cfg(teachers[14], run_dir, image_root, extra=["train.max_iterations=2",
                                                                 *_tracking_overrides(tmp_path, "mlflow")])
    run_distillation(cfg)
    record = json.loads((run_dir / "trackers.json").read_text())
    client, run = _mlflow_run(record["mlflow"]["tracking_uri"], record["mlflow"]["run_id"])
    assert run.data.params["distill.method"] == "features"
    assert run.data.tags["export_path"] == str(student_export_path(run_dir, "vit_micro").resolve())
    rows = read_metrics(run_dir / "metrics.jsonl")
    _assert_series(_history(client, run.info.run_id, "total_loss"), [(r["iteration"], r["total_loss"]) for r in rows])


# ---- segmentation ----------------------------------------------------------------------------------
def test_segmentation_logs_steps_results_and_head(geotiff_folder, tiny_backbone, tmp_path, one_torch_thread):
    from dinov2_repro.tracking.wandb_offline import read_offline_run

    run_dir = tmp_path / "seg"
    assert cli_main(["eval", "seg", "--data", str(geotiff_folder), "--backbone", str(tiny_backbone), "--tile", "28",
                     "--decoder", "linear", "--iterations", "3", "--lrs", "0.01,0.001", "--out-dir", str(run_dir),
                     "--out", str(tmp_path / "m.json"), "--loggers", "mlflow,wandb",
                     "--tracking", f"mlflow.tracking_uri=file:{tmp_path / 'mlruns'}",
                     "--tracking", f"wandb.dir={tmp_path / 'wandb'}", "--tracking", "wandb.mode=offline"]) == 0
    result = json.loads((tmp_path / "m.json").read_text())
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert [r["iteration"] for r in rows if "train_loss" in r] == [1, 2, 3, 4, 5, 6]  # one series over the lr sweep
    record = json.loads((run_dir / "trackers.json").read_text())
    head = str((run_dir / "head.safetensors").resolve())
    client, run = _mlflow_run(record["mlflow"]["tracking_uri"], record["mlflow"]["run_id"])
    assert run.data.params["seg.decoder"] == "linear" and run.data.params["seg.iterations"] == "3"
    assert run.data.tags["export_path"] == head
    assert run.data.metrics["test.miou"] == pytest.approx(result["test"]["miou"])
    assert run.data.metrics["best_lr"] == pytest.approx(result["lr"])
    assert len(_history(client, run.info.run_id, "train_loss")) == 6
    assert _history(client, run.info.run_id, "val.miou")[0][0] == 3  # the first lr's last step
    offline = read_offline_run(tmp_path / "wandb")
    assert offline["summary"]["export_path"] == head
    assert offline["summary"]["test/miou"] == pytest.approx(result["test"]["miou"])
    assert offline["config"]["seg"]["decoder"] == "linear"


# ---- errors before any work ------------------------------------------------------------------------
def test_missing_tracker_package_is_one_line_exit_2(monkeypatch, tmp_path, capsys):
    from dinov2_repro.tracking import settings

    monkeypatch.setattr(settings, "is_installed", lambda name: name not in ("mlflow", "wandb"))
    for name in ("mlflow", "wandb"):
        code = cli_main(["train", "--config-file", "vit_tiny_cpu", f"train.output_dir={tmp_path / name}",
                         f"train.loggers=[jsonl,{name}]"])
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1
        assert f"train.loggers includes {name} but the {name} package is not installed" in err
        assert f"pip install '.[{name}]' in the checkout" in err
        assert not (tmp_path / name / "config.yaml").exists()  # failed before any work
    code = cli_main(["eval", "seg", "--data", str(tmp_path / "absent"), "--loggers", "wandb"])
    assert code == 2 and "--loggers includes wandb" in capsys.readouterr().err


def test_bad_tracker_settings_are_config_errors(tmp_path, capsys):
    from dinov2_repro.train.validate import check_trackers

    with pytest.raises(ConfigError, match="unknown tracker 'comet'"):
        check_trackers(load_config(None, ["train.loggers=[jsonl,comet]"]))
    with pytest.raises(ConfigError, match="tracking.wandb.mode='sometimes'"):
        check_trackers(load_config(None, ["train.loggers=[wandb]", "tracking.wandb.mode=sometimes"]))
    with pytest.raises(ConfigError, match="tracking.mlflow.experiment is empty"):
        check_trackers(load_config(None, ["train.loggers=[mlflow]", "tracking.mlflow.experiment="]))
    with pytest.raises(ConfigError, match="unknown config key 'tracking.mlflow.uri'"):
        load_config(None, ["tracking.mlflow.uri=file:/x"])
    code = cli_main(["eval", "seg", "--data", str(tmp_path), "--tracking", "wandb.projekt=x"])
    assert code == 2 and "unknown config key 'wandb.projekt'" in capsys.readouterr().err


def test_jsonl_is_always_on():
    from dinov2_repro.tracking import normalise_loggers

    assert normalise_loggers([]) == ("jsonl",)
    assert normalise_loggers(["wandb", "jsonl", "mlflow", "wandb"]) == ("jsonl", "wandb", "mlflow")
    assert load_config(None, []).train.loggers == ["jsonl", "tensorboard"]
    assert torch.__version__  # the suite's torch import is shared with the training fixtures
