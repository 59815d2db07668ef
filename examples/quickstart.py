"""Quick start with the Python API, at tiny scale (about a minute on 2 CPU cores).

Run it as a script (``python examples/quickstart.py [WORKDIR]``) or cell by cell in a notebook:
each ``# %%`` line starts a cell. It pretrains the tiny CPU recipe for a few iterations on the
shipped sample tiles, loads the exported backbone, embeds images, and plans a cluster run.
Every call is what the matching ``dinov2-repro`` verb runs.
"""
# %%
import sys
import tempfile
from pathlib import Path

import dinov2_repro

workdir = Path(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="dinov2_quickstart_"))

# %% Pretrain: the shipped tiny recipe by name, shortened to 4 iterations for this example.
run = dinov2_repro.train("vit_tiny_cpu", [f"train.output_dir={workdir / 'tiny'}", "train.max_iterations=4"])
print(f"trained {run['iteration']} iterations, loss {run['total_loss']:.3f}; backbone: {run['export']}")

# %% Load the exported backbone and embed images (uint8 HxWxC arrays, float tensors or PIL images).
from dinov2_repro.data.sample_data import landcover_tiles  # noqa: E402  (a notebook cell)

backbone = dinov2_repro.load_backbone(run["export"])
train_x, train_y, test_x, test_y = landcover_tiles()
cls = backbone.embed(test_x[:32], size=56)  # (32, embed_dim): one CLS vector per tile
patches = backbone.patch_features(test_x[:32], size=56)  # (32, rows, cols, embed_dim): one vector per patch
print(f"CLS features {tuple(cls.shape)}, patch features {tuple(patches.shape)}")

# %% Nearest neighbours: cosine similarity of CLS features.
import torch.nn.functional as F  # noqa: E402

unit = F.normalize(cls, dim=1)
nearest = (unit @ unit.T).fill_diagonal_(-1).argmax(dim=1)
print(f"tile 0's nearest neighbour is tile {int(nearest[0])}")

# %% Plan a cluster run: FLOPs and per-GPU memory traced from one step on fake tensors. (Without
# mfu=..., the planner also traces the paper's ViT-g step to derive its default MFU: minutes.)
plan = dinov2_repro.plan("vit_tiny_cpu", nodes=1, gpus_per_node=2, gpu="h100-80gb", mfu=0.4)
print(f"plan: {plan['flops_per_gpu_step']['total'] / 1e12:.3f} TFLOP per GPU step, "
      f"peak {plan['memory_bytes']['peak'] / 2**30:.2f} GiB per GPU, fits: {plan['fits']}")

# %% The results are plain dicts and tensors: nothing to parse.
summary = {"export": run["export"], "cls_shape": list(cls.shape), "patch_shape": list(patches.shape),
           "plan_fits": plan["fits"]}
print(summary)
