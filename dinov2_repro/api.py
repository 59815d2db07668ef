"""The Python API: one function per pipeline stage, the same functions the ``dinov2-repro`` verbs
call (the verbs only parse their command line and print what these return), so a notebook and
the command line cannot drift apart.

Every function returns structured results (dicts of numbers and paths), never printed text, and
raises ``ConfigError`` (a subclass of ``ValueError``) for a user mistake. Heavy modules (torch,
faiss, rasterio) are imported when a function runs, not when ``dinov2_repro`` is imported.

The same names are available at the top level: ``dinov2_repro.train(...)``,
``dinov2_repro.curate(...)``, ``dinov2_repro.load_backbone(...)``, and so on.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

if TYPE_CHECKING:
    from .launch.options import LauncherOptions

PathLike = str | os.PathLike


def _launcher_options(launcher: str | LauncherOptions | None) -> LauncherOptions:
    from .launch.options import LauncherOptions

    if launcher is None:
        return LauncherOptions()
    if isinstance(launcher, str):
        return LauncherOptions(launcher=launcher)
    return launcher


def _launch(child_argv: list[str], options: LauncherOptions, output_dir: str) -> dict[str, Any]:
    from .launch.dispatch import launch_command

    exit_code = launch_command(child_argv, options)
    return {"launcher": options.launcher, "world_size": options.world_size, "exit_code": int(exit_code),
            "output_dir": output_dir}


def train(config: PathLike | None = None, overrides: Sequence[str] = (), *,
          launcher: str | LauncherOptions | None = None) -> dict[str, Any]:
    """SSL pretraining (DINO + iBOT + KoLeo); resumes from ``train.output_dir/checkpoints/last``.

    Args:
        config: an experiment YAML (a path, or the name of a shipped recipe such as
            ``"vit_tiny_cpu"``) merged over ``configs/ssl_default_config.yaml``; None: defaults only.
        overrides: ``key=value`` strings applied last, e.g. ``["train.output_dir=runs/a"]``.
        launcher: None or ``"none"`` trains in this process; ``"local"``, ``"slurm"`` or a
            :class:`~dinov2_repro.launch.options.LauncherOptions` (processes, nodes, Slurm
            partition, ...) runs the same command under that launcher.

    Returns:
        In this process: the last logged metrics (``iteration``, ``total_loss``, each loss term,
        ``lr``, ...) plus ``output_dir`` and ``export`` (the teacher backbone file). Under a
        launcher: ``launcher``, ``world_size``, ``exit_code`` and ``output_dir``.
    """
    from .config import load_config, resolve_config_file

    config_file = resolve_config_file(config, recipes="train")
    cfg = load_config(config_file, list(overrides))  # validated before anything is launched
    options = _launcher_options(launcher)
    output_dir = str(cfg.train.output_dir)
    if options.launcher != "none":
        from .train.validate import validate_train_config

        validate_train_config(cfg)  # fail here, not in every rank
        child = ["train", *(["--config-file", str(config_file)] if config_file else []), *overrides]
        return _launch(child, options, output_dir)
    from .train.pretrain import TEACHER_EXPORT, run_ssl_training

    result = dict(run_ssl_training(cfg))
    return {**result, "output_dir": output_dir, "export": str(Path(output_dir) / TEACHER_EXPORT)}


def distill(config: PathLike | None = None, overrides: Sequence[str] = (), *, teacher: PathLike | None = None,
            launcher: str | LauncherOptions | None = None) -> dict[str, Any]:
    """Distil a frozen pretrained teacher into one or more smaller students.

    Args:
        config: a distillation YAML (e.g. ``configs/distill/tiny_cpu.yaml``) merged over the SSL
            and distillation defaults.
        overrides: ``key=value`` strings, e.g. ``["distill.students=[vit_small,vit_base]"]``.
        teacher: a pretraining run directory, one of its ``checkpoints/iter_*`` directories, a
            teacher bundle (``export --with-heads``) or a backbone file; overrides ``distill.teacher``.
        launcher: as for :func:`train`.

    Returns:
        The last logged metrics plus ``output_dir`` and ``exports`` ({student name: backbone
        file}); under a launcher, as :func:`train`.
    """
    from .distill import load_distill_config, run_distillation

    cfg = load_distill_config(None if config is None else str(config), list(overrides),
                              teacher=None if teacher is None else str(teacher))  # checks the teacher too
    options = _launcher_options(launcher)
    output_dir = str(cfg.train.output_dir)
    if options.launcher != "none":
        child = ["distill", *(["--config-file", str(config)] if config else []),
                 *(["--teacher", str(teacher)] if teacher else []), *overrides]
        return _launch(child, options, output_dir)
    result = dict(run_distillation(cfg))
    exports = sorted((Path(output_dir) / "export").glob("student_*_backbone.safetensors"))
    names = {p.name[len("student_"):-len("_backbone.safetensors")]: str(p) for p in exports}
    return {**result, "output_dir": output_dir, "exports": names}


def curate(stage: str, config: PathLike | None = None, overrides: Sequence[str] = (), *, shards: int = 1,
           launcher: str | LauncherOptions | None = None, array_parallelism: int | None = None,
           from_embeddings: PathLike | None = None, dry_run: bool = False) -> dict[str, Any]:
    """Run one curation stage, or ``"all"`` of them in order (tile, embed, dedup, retrieve,
    cluster, sample, export).

    Args:
        stage: a stage name or ``"all"``.
        config: a curation YAML (a path or a shipped recipe name such as ``"demo"``) merged over
            ``configs/curation/default.yaml``.
        overrides: ``key=value`` strings, e.g. ``["output_dir=runs/curation"]``.
        shards: tasks per sharded phase (the result is the same for any number).
        launcher: None/``"none"`` runs the tasks one after the other here, ``"local"`` as local
            processes, ``"slurm"`` as Slurm job arrays (options as for :func:`train`).
        array_parallelism: at most this many tasks of an array at once.
        from_embeddings: pool embeddings made elsewhere (``index.json`` + float16 ``.npy`` shards).
        dry_run: describe the job arrays (printed as JSON lines) without running them.

    Returns:
        ``stages`` run, ``output_dir``, ``manifest`` (the exported training manifest, when it
        exists) and ``jobs`` (Slurm job ids; empty otherwise).
    """
    from .config import ConfigError, resolve_config_file
    from .curation.config import load_curation_config
    from .curation.pipeline import PIPELINE
    from .curation.runner import run

    if stage != "all" and stage not in PIPELINE:
        raise ConfigError(f"curate: unknown stage {stage!r}; choose one of {', '.join(PIPELINE)}, all")
    options = _launcher_options(launcher)
    if shards < 1:
        raise ConfigError(f"--shards={shards}: must be >= 1")
    if array_parallelism is not None and array_parallelism < 1:
        raise ConfigError(f"--array-parallelism={array_parallelism}: must be >= 1")
    if options.nproc != 1 or options.nodes != 1:
        raise ConfigError(f"--nproc={options.nproc} --nodes={options.nodes}: curate runs one process per task; "
                          f"use --shards (tasks per array) and --array-parallelism instead")
    overrides = list(overrides) + ([f"embed.from_embeddings={from_embeddings}"] if from_embeddings else [])
    cfg = load_curation_config(resolve_config_file(config, recipes="curation"), overrides)
    stages = list(PIPELINE) if stage == "all" else [stage]
    jobs = run(cfg, stages, launcher=options.launcher, num_shards=shards, array_parallelism=array_parallelism,
               options=options, dry_run=dry_run)
    manifest = Path(cfg.output_dir) / "export" / "manifest.jsonl"
    return {"stages": stages, "output_dir": str(cfg.output_dir),
            "manifest": str(manifest) if manifest.is_file() and not dry_run else None,
            "jobs": [str(getattr(job, "job_id", job)) for job in jobs or []]}


def load_backbone(path: PathLike, *, device: str = "cpu"):  # -> Backbone (imported lazily)
    """A backbone file as a ready-to-use model: ``embed(images)`` and ``patch_features(images)``.

    Takes any backbone file the project reads: its own exports (teacher or student), or a
    released DINOv2/DINOv3 file. See :class:`dinov2_repro.backbone.Backbone`. (The lower-level
    :func:`dinov2_repro.backbone_file.load_backbone` returns the bare ``nn.Module`` and header.)
    """
    from .backbone import Backbone

    return Backbone.from_file(path, device=device)


def eval_seg(data: str, backbone: PathLike | None = None, *, out_dir: PathLike | None = None, decoder: str = "unet",
             name: str = "teacher", tile: int = 56, bands: Sequence[int] | None = None,
             classes: Sequence[int] | None = None, class_names: Sequence[str] | None = None, ignore_index: int = 255,
             split_seed: int = 0, lrs: Sequence[float] = (1e-3,), iterations: int = 200, batch_size: int = 8,
             seed: int = 0, loss: str | None = None, class_weights: str | None = None, tta: str = "none",
             knn_k: int = 20, guided_filter: int = 0, train_backbone: str = "none", layer_decay: float = 1.0,
             expand_bands: str | None = None, iou: float = 0.5, min_area_px: float = 0.0,
             size_bins: Sequence[float] = (100.0, 400.0, 1600.0), n_labelled: str | Sequence[int | None] | None = None,
             seeds: Sequence[int] = (0,), compare: Mapping[str, PathLike] | None = None,
             baselines: Sequence[str] = ("random_init", "spectral", "supervised"), loggers: str | Sequence[str] = "",
             tracking: Sequence[str] = ()) -> dict[str, Any]:
    """Segmentation with a frozen (or fine-tuned) backbone and a trained decoder; with
    ``n_labelled``, label efficiency against baselines.

    Args:
        data: ``"landsat"`` (the shipped scene and its strata map), a folder with ``images/`` and
            ``masks/`` (or ``train|val|test/{images,masks}``), or a JSONL/Parquet manifest with
            ``path`` and ``mask`` columns.
        backbone: a backbone file; None trains the supervised U-Net baseline alone.
        out_dir: the run directory (``seg_run.json``, ``head.safetensors``, ``metrics.json``),
            which :func:`predict_seg` reads; None: nothing is saved.
        decoder: ``linear``, ``unet``, ``upernet``, ``dpt`` or ``knn`` (training-free).
        bands: 1-based bands to read, in order.
        classes: the mask codes that are classes, in order (default: those found).
        class_names: one name per class.
        lrs: learning rates swept (best on val); label efficiency uses the first.
        n_labelled: e.g. ``"2,8,all"`` or ``[2, 8, None]``: label efficiency over ``seeds``,
            with ``compare`` ({name: backbone file}) and ``baselines``.
        loggers: experiment trackers besides ``metrics.jsonl`` (``tensorboard``, ``mlflow``,
            ``wandb``; single runs only), set up by ``tracking`` (``KEY=VALUE`` of the config's
            ``tracking:`` section; ``docs/trackers.md``).

    The other arguments are the ``dinov2-repro eval seg`` options of the same name
    (``docs/evaluation.md`` and ``docs/segmentation.md``).

    Returns:
        The metrics (test mIoU, per-class IoU, pixel accuracy, ...), or the label-efficiency table.
    """
    options = dict(locals())  # the run's options, logged as the trackers' params
    import tempfile

    from .config import ConfigError
    from .eval.segmentation.tracking import open_seg_trackers, refuse_label_efficiency, seg_tracking_settings
    from .eval.segmentation.train import ModelSpec, ObjectOptions, prepare_data, run_segmentation

    if n_labelled and (tta != "none" or guided_filter):
        raise ConfigError("--tta and --guided-filter apply to single runs, not to label efficiency (--n-labelled)")
    out_dir = Path(out_dir) if out_dir else None
    names = loggers if isinstance(loggers, str) else ",".join(loggers)
    tracker_settings = seg_tracking_settings(names, list(tracking), out_dir)  # an uninstalled tracker fails here
    if n_labelled:
        refuse_label_efficiency(tracker_settings)
    if expand_bands:  # the format is checked before any data is read; the band numbers once it is
        from .band_expansion import parse_band_expansion

        try:
            parse_band_expansion(expand_bands)
        except ValueError as error:
            raise ConfigError(str(error)) from None
    # The shipped example writes its 6-band stack into the run directory (a temporary one without out_dir).
    workdir = out_dir or Path(tempfile.mkdtemp(prefix="dinov2_repro_seg_"))
    prepared = prepare_data(data=data, workdir=workdir, tile=tile, bands=list(bands) if bands else None,
                            classes=list(classes) if classes else None,
                            class_names=list(class_names) if class_names else None,
                            ignore_index=ignore_index, split_seed=split_seed)
    kind = "vit" if backbone else "supervised"
    if expand_bands and not backbone:
        raise ConfigError("--expand-bands needs --backbone (it expands that backbone's RGB patch embedding)")
    if decoder == "knn" and not backbone:
        raise ConfigError("--decoder knn needs --backbone (it votes with the backbone's patch features)")
    knn = {"knn_k": knn_k, "guided_filter": guided_filter, "train_backbone": train_backbone,
           "layer_decay": layer_decay, "expand_bands": expand_bands or None}
    main_spec = ModelSpec(name=name, kind=kind, backbone=str(backbone) if backbone else None, decoder=decoder, **knn)
    objects = ObjectOptions(iou, min_area_px, tuple(float(b) for b in size_bins))
    if not n_labelled:
        trackers = open_seg_trackers(tracker_settings, options)
        try:
            result = run_segmentation(main_spec, prepared, out_dir=out_dir, lrs=list(lrs), iterations=iterations,
                                      batch_size=batch_size, seed=seed, loss=loss, class_weights=class_weights,
                                      objects=objects, tta=tta, trackers=trackers)
        except BaseException:
            trackers.close("FAILED")
            raise
        trackers.close()
        return result
    from .eval.segmentation.label_efficiency import parse_n_labelled, run_label_efficiency

    n_values = parse_n_labelled(n_labelled) if isinstance(n_labelled, str) else list(n_labelled)
    specs = [main_spec]
    for other, path in (compare or {}).items():
        specs.append(ModelSpec(name=other, kind="vit", backbone=str(path), decoder=decoder, **knn))
    for baseline in baselines:
        if baseline == "random_init":
            if not backbone:
                raise ConfigError("--baselines random_init needs --backbone (it rebuilds that architecture)")
            specs.append(ModelSpec(name="random_init", kind="random_init", backbone=str(backbone), decoder=decoder, **knn))
        elif baseline in ("spectral", "supervised"):
            specs.append(ModelSpec(name=baseline, kind=baseline))
        else:
            raise ConfigError(f"--baselines: unknown baseline {baseline!r}; choose from random_init, spectral, supervised")
    return run_label_efficiency(specs, prepared, n_values=n_values, seeds=list(seeds) or [0], lr=list(lrs)[0],
                                iterations=iterations, batch_size=batch_size, out_dir=out_dir, loss=loss,
                                class_weights=class_weights, objects=objects)


def predict_seg(checkpoint: PathLike, scene: PathLike, out: PathLike, *, overlap: float = 0.25, batch_size: int = 16,
                tta: str = "none", vector: PathLike | None = None, vector_min_area_px: float = 0.0,
                vector_simplify: float = 0.0, progress: bool = True) -> dict[str, Any]:
    """The class map of a whole GeoTIFF scene from an :func:`eval_seg` run directory.

    Sliding windows with ``overlap`` (a fraction of the tile), streamed strip by strip, so the
    scene may be larger than memory. Writes ``out`` (GeoTIFF of class codes with the scene's CRS
    and transform), a colour ``.png`` preview beside it and, with ``vector`` (``.gpkg`` or
    ``.geojson``), the map's polygons. ``tta``: ``none``, ``flip`` (4 views) or ``d4`` (8 views).

    Returns:
        The written paths, the scene size, the class codes and per-class pixel counts.
    """
    from .eval.segmentation.predict import predict_scene

    return predict_scene(checkpoint, scene, out, overlap=overlap, batch_size=batch_size, progress=progress, tta=tta,
                         vector=vector, vector_min_area_px=vector_min_area_px, vector_simplify=vector_simplify)


def plan(config: PathLike, overrides: Sequence[str] = (), *, nodes: int = 1, gpus_per_node: int = 8,
         gpu: str = "a100-80gb", mfu: float | None = None, teacher_config: PathLike | None = None) -> dict[str, Any]:
    """FLOPs, per-GPU memory, fit, step time and GPU-hours of a recipe at a cluster size, traced
    from one real training step on fake tensors (no GPU needed).

    Args:
        config: a training YAML (a path or a shipped recipe name), or a distillation YAML
            together with ``teacher_config`` (the teacher's training YAML).
        overrides: ``key=value`` strings.
        nodes: nodes of the planned cluster.
        gpus_per_node: GPUs per node (the world size is nodes x gpus_per_node).
        gpu: ``a100-40gb``, ``a100-80gb``, ``h100-80gb``, ``h200`` or ``custom:TFLOPS,GB``.
        mfu: model-FLOPs utilisation; None uses the one implied by the paper's ViT-g GPU-hours.

    Returns:
        The plan: FLOPs per part, memory per part and peak, whether it fits, remedies when it does
        not, step time and GPU-hours (the same dict ``dinov2-repro plan --out`` writes as JSON).
    """
    from .config import ConfigError, resolve_config_file
    from .plan.cli import plan_from_args

    try:  # a path, or the name of a shipped training (else distillation) recipe
        config_file = resolve_config_file(config, recipes="train")
    except ConfigError:
        config_file = resolve_config_file(config, recipes="distill")
    return plan_from_args(config_file=str(config_file), overrides=list(overrides), nodes=nodes, gpus_per_node=gpus_per_node,
                          gpu=gpu, mfu=mfu, teacher_config=None if teacher_config is None else str(teacher_config))


__all__ = ["train", "distill", "curate", "load_backbone", "eval_seg", "predict_seg", "plan"]
