"""Writes a LeRobot v3.0 dataset with lerobot's own writer (LeRobotDataset.create, add_frame,
save_episode, finalize), for tests/dataset/lerobot_interop.rs, and the values it was given as
safetensors (one tensor per feature stacked over all frames, episodes in order).

usage: lerobot_write.py DATASET_DIR VALUES.safetensors EPISODES FRAMES_PER_EPISODE SIZE [image|video]
The pictures are SIZE x SIZE, stored as image (the default) or video features; frame f of
episode e holds smooth, seeded data.
"""
import sys

import numpy as np
import torch
from safetensors.torch import save_file

from lerobot.datasets.lerobot_dataset import LeRobotDataset

root, out, episodes, frames, size = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
kind = sys.argv[6] if len(sys.argv) > 6 else "image"
features = {
    "observation.images.wrist": {"dtype": kind, "shape": (size, size, 3), "names": ["height", "width", "channels"]},
    "observation.state": {"dtype": "float32", "shape": (7,), "names": [f"joint{i}" for i in range(7)]},
    "observation.tactile": {"dtype": "float32", "shape": (6,), "names": None},
    "action": {"dtype": "float32", "shape": (7,), "names": None},
}
ds = LeRobotDataset.create("local/written", fps=10, root=root, features=features, use_videos=kind == "video")
rng = np.random.default_rng(7)
values = {k: [] for k in features}
yy, xx = np.mgrid[0:size, 0:size]
for e in range(episodes):
    for f in range(frames):
        t = f / 10.0
        img = np.stack([(xx * 4 + f * 9 + e * 40) % 256, (yy * 4 + e * 17) % 256, ((xx + yy) * 2 + f * 5) % 256], axis=-1).astype(np.uint8)
        frame = {
            "observation.images.wrist": img,
            "observation.state": (np.sin(t + np.arange(7)) + 0.01 * rng.standard_normal(7)).astype(np.float32),
            "observation.tactile": (np.cos(3 * t + np.arange(6)) + 0.01 * rng.standard_normal(6)).astype(np.float32),
            "action": (0.1 * np.cos(t + np.arange(7))).astype(np.float32),
        }
        for k, v in frame.items():
            values[k].append(v)
        ds.add_frame({**frame, "task": f"push the block {'left' if e % 2 else 'right'}"})
    ds.save_episode()
ds.finalize()
save_file({k: torch.from_numpy(np.stack(v)).contiguous() for k, v in values.items()}, out)
