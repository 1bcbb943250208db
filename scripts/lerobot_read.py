"""Loads a local LeRobot v3.0 dataset with lerobot's LeRobotDataset and dumps what it reads, for
tests/dataset/lerobot_interop.rs: every frame's values (safetensors, one tensor per feature stacked over
frames; pictures as LeRobot returns them, float32 [N, 3, H, W] in [0, 1]) and a JSON file with
the features, per-frame tasks, meta/stats.json as loaded and the same statistics recomputed with
lerobot's own get_feature_stats over the loaded frames.

usage: lerobot_read.py DATASET_DIR OUT_PREFIX   (writes OUT_PREFIX.safetensors and OUT_PREFIX.json)
"""
import json
import sys

import numpy as np
import torch
from safetensors.torch import save_file

from lerobot.datasets.compute_stats import get_feature_stats
from lerobot.datasets.lerobot_dataset import LeRobotDataset

root, prefix = sys.argv[1], sys.argv[2]
ds = LeRobotDataset("local/exported", root=root)
keys = [k for k, f in ds.features.items() if f["dtype"] != "string"]
frames = [ds[i] for i in range(len(ds))]
tensors = {k: torch.stack([torch.as_tensor(f[k]) for f in frames]).contiguous() for k in keys}
save_file(tensors, prefix + ".safetensors")
recomputed = {}
for k, f in ds.features.items():
    if f["dtype"] in ("float32", "float64") and k not in ("timestamp",):
        arr = tensors[k].numpy().astype(np.float64)
        arr = arr.reshape(-1, arr.shape[-1])  # pooled over every axis but the last, as LeRobot does
        recomputed[k] = {s: np.asarray(v).tolist() for s, v in get_feature_stats(arr, axis=0, keepdims=False).items()}
meta = {
    "len": len(ds),
    "num_episodes": ds.meta.total_episodes,
    "fps": ds.fps,
    "features": {k: {"dtype": f["dtype"], "shape": list(f["shape"])} for k, f in ds.features.items()},
    "shapes": {k: list(v.shape) for k, v in tensors.items()},
    "dtypes": {k: str(v.dtype) for k, v in tensors.items()},
    "tasks": [f["task"] for f in frames],
    "stats": {k: {s: np.asarray(v).tolist() for s, v in st.items()} for k, st in ds.meta.stats.items()},
    "recomputed_stats": recomputed,
}
with open(prefix + ".json", "w") as fh:
    json.dump(meta, fh)
