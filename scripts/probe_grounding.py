"""Can the demo task's target be read from what the policy sees? A learning-curve probe (issue 20).

For the compiled datasets of two `vla_finetune record --sim` runs (training scenes, and scenes of
a simulator seed the probe never trains on), this fits a ridge regression and a 2-layer MLP from
each of these inputs to the target's x, y (mm, from the simulator's truth log) on the first N
training scenes, for several N, and prints R^2 on the other seed's scenes (and, as the control
that the probes can read a position at all, pixels to the tool's x, y from the pose state):

- `pixels`: both camera images, 56 x 42 RGB;
- `vision_tokens`: the vision tower's merged tokens, as they enter the language model;
- `tokens`: the language model's last hidden state at the image tokens;
- `pooled_all`, `pooled_last`: the Stage 1 features (mean over all tokens; the last token).

A third probe reads the instruction as the policy would need to: multi-head attention whose query
is the instruction (one-hot colour and relation words) over the image tokens, each token with a
learned position embedding, then an MLP to x, y. It reads `vision_tokens`, `tokens` and, as its
upper bound, `pixel_cells` (the raw 28 x 28 pixel cell each merged token covers).

Features come from transformers' Qwen2_5_VLForConditionalGeneration on the model folder (default:
the demo's embedded tiny random model) with the fixtures' processor settings.

    vla_finetune record --sim --episodes 800 --seconds 1.5 --seed 7 --width 112 --height 84 \
        --camera-hz 10 --out T/tr/recordings   # and --episodes 150 --seed 1007 --out T/va/...
    vla_finetune dataset compile --episodes T/tr/recordings --out T/tr/dataset --config C
    python scripts/probe_grounding.py T/tr T/va --scenes 50,200,800

(C: align.sensor_window_s 0.1, align.sensor_samples 65, split.val_fraction 0.0.)
"""

import argparse
import io
import json
import os
import sys

import numpy as np
import torch
from PIL import Image
from safetensors import safe_open
from transformers import (
    AutoTokenizer,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2VLImageProcessor,
    Qwen2VLVideoProcessor,
)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gen_vlm_fixtures as fixtures  # noqa: E402

INPUTS = ["pixels", "vision_tokens", "tokens", "pooled_all", "pooled_last"]
TOKEN_INPUTS = ["vision_tokens", "tokens", "pixel_cells"]
COLOURS = ["red", "green", "blue", "yellow"]
RELATIONS = ["left", "right", "upper", "lower"]
CELL = 28  # pixels per merged image token (patch 14 x merge 2)


def processor(model_dir):
    return Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(min_pixels=fixtures.MIN_PIXELS, max_pixels=fixtures.MAX_PIXELS),
        tokenizer=AutoTokenizer.from_pretrained(model_dir),
        video_processor=Qwen2VLVideoProcessor(),
        chat_template=fixtures.CHAT_TEMPLATE,
    )


def load(root, per_episode, model, proc):
    """Inputs of the first `per_episode` samples of every episode, with their target x, y, tool
    x, y and episode index."""
    idx = json.load(open(f"{root}/dataset/index.json"))
    truth = [json.loads(line) for line in open(f"{root}/recordings/sim_truth.jsonl")]
    shards = {}

    def shard(s):
        """The sample's shard: its pose state and, per camera, encoded images and their offsets."""
        if s["shard"] not in shards:
            f = safe_open(f"{root}/dataset/{idx['shards'][s['shard']]['file']}", "np")
            cams = [(f.get_tensor(f"image.{c['name']}"), f.get_tensor(f"image.{c['name']}.offsets")) for c in idx["cameras"]]
            shards[s["shard"]] = (f.get_tensor("state"), cams)
        return shards[s["shard"]]

    xs = {k: [] for k in INPUTS + ["pixel_cells", "words"]}
    ys, tools, episodes, seen = [], [], [], {}
    for s in idx["samples"]:
        e = s["episode"]
        seen[e] = seen.get(e, 0) + 1
        if seen[e] > per_episode:
            continue
        state, cams = shard(s)
        r = s["row"]
        images = [Image.open(io.BytesIO(d[o[r]:o[r + 1]].tobytes())).convert("RGB") for d, o in cams]
        content = [{"type": "image"} for _ in images] + [{"type": "text", "text": idx["episodes"][e]["instruction"]}]
        text = proc.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
        inp = proc(text=[text], images=images, return_tensors="pt")
        with torch.no_grad():
            out = model(**inp, output_hidden_states=True)
        last = out.hidden_states[-1][0]
        image = inp["input_ids"][0] == model.config.image_token_id
        xs["pixels"].append(np.concatenate([np.asarray(i.resize((56, 42)), np.float32).ravel() / 255 for i in images]))
        xs["vision_tokens"].append(out.hidden_states[0][0][image].numpy())
        xs["tokens"].append(last[image].numpy())
        xs["pixel_cells"].append(np.concatenate([cells(i) for i in images]))
        words = idx["episodes"][e]["instruction"].split()
        xs["words"].append(np.array([float(w in words) for w in COLOURS + RELATIONS], np.float32))
        xs["pooled_all"].append(last.mean(0).numpy())
        xs["pooled_last"].append(last[-1].numpy())
        scene = next((t for t in truth if t["start_ns"] <= s["t_ns"] <= t["end_ns"]), None)
        if scene is None:
            sys.exit(f"{root}: sample at {s['t_ns']} ns is in no episode of the truth log")
        ys.append(scene["target_mm"][:2])
        tools.append(state[r, :2])
        episodes.append(e)
    xs = {k: np.array(v) for k, v in xs.items()}
    return xs, np.array(ys, np.float32), np.array(tools, np.float32), np.array(episodes)


def cells(image):
    """The image's CELL x CELL pixel cells in the merged tokens' order (row-major), flattened."""
    a = np.asarray(image, np.float32) / 255
    rows, cols = a.shape[0] // CELL, a.shape[1] // CELL
    return np.stack([a[r * CELL:(r + 1) * CELL, c * CELL:(c + 1) * CELL].ravel() for r in range(rows) for c in range(cols)])


def r2(pred, truth):
    return float((1 - ((pred - truth) ** 2).sum(0) / ((truth - truth.mean(0)) ** 2).sum(0)).mean())


def ridge_r2(za, ya, zb, yb):
    """The best validation R^2 over the ridge strengths (an upper bound of what ridge reads)."""
    best = -np.inf
    for lam in [1, 10, 100, 1000, 10000]:
        w = za.T @ np.linalg.solve(za @ za.T + lam * np.eye(len(za)), ya - ya.mean(0))
        best = max(best, r2(zb @ w + ya.mean(0), yb))
    return best


def mlp_r2(za, ya, zb, yb, steps):
    torch.manual_seed(0)
    a, b = torch.tensor(za, dtype=torch.float32), torch.tensor(zb, dtype=torch.float32)
    mean, std = ya.mean(0), ya.std(0)
    target = torch.tensor((ya - mean) / std)
    net = torch.nn.Sequential(
        torch.nn.Linear(a.shape[1], 256), torch.nn.GELU(), torch.nn.Linear(256, 256), torch.nn.GELU(), torch.nn.Linear(256, 2)
    )
    opt = torch.optim.AdamW(net.parameters(), 1e-3, weight_decay=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        loss = ((net(a) - target) ** 2).mean()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return r2(net(b).numpy() * std + mean, yb), loss.item()


class InstructionAttention(torch.nn.Module):
    """The instruction's words query the tokens (4 heads; keys and values: an MLP of the token
    plus its learned position embedding); the attended vector and the words give x, y."""

    def __init__(self, dim, tokens, words, width=64, heads=4):
        super().__init__()
        self.heads = heads
        self.key = torch.nn.Sequential(torch.nn.Linear(dim, width), torch.nn.GELU(), torch.nn.Linear(width, width))
        self.pos = torch.nn.Parameter(0.1 * torch.randn(tokens, width))
        self.query = torch.nn.Linear(words, width)
        self.out = torch.nn.Sequential(torch.nn.Linear(width + words, width), torch.nn.GELU(), torch.nn.Linear(width, 2))

    def forward(self, x, w):
        k = self.key(x) + self.pos
        b, n, d = k.shape
        k = k.view(b, n, self.heads, d // self.heads)
        q = self.query(w).view(b, 1, self.heads, d // self.heads)
        att = torch.softmax((k * q).sum(-1) / (d // self.heads) ** 0.5, 1)
        return self.out(torch.cat([(att.unsqueeze(-1) * k).sum(1).reshape(b, d), w], 1))


def attention_r2(za, wa, ya, zb, wb, yb, epochs):
    """R^2 of InstructionAttention on the unseen scenes, and on its own training scenes."""
    torch.manual_seed(0)
    a, b = torch.tensor(za), torch.tensor(zb)
    wa, wb = torch.tensor(wa), torch.tensor(wb)
    mean, std = ya.mean(0), ya.std(0)
    target = torch.tensor((ya - mean) / std)
    net = InstructionAttention(a.shape[2], a.shape[1], wa.shape[1])
    opt = torch.optim.AdamW(net.parameters(), 2e-3, weight_decay=1e-2)
    for _ in range(epochs):
        order = torch.randperm(len(a))
        for i in range(0, len(a), 32):
            j = order[i:i + 32]
            opt.zero_grad()
            ((net(a[j], wa[j]) - target[j]) ** 2).mean().backward()
            opt.step()
    with torch.no_grad():
        return r2(net(b, wb).numpy() * std + mean, yb), r2(net(a, wa).numpy() * std + mean, ya)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("train", help="root with recordings/ and dataset/ of the training scenes")
    ap.add_argument("val", help="the same for scenes of another simulator seed")
    ap.add_argument("--model", default=os.path.join(os.path.dirname(__file__), "..", "tests/fixtures/vlm/tiny_a"))
    ap.add_argument("--per-episode", type=int, default=2, help="samples taken from each episode")
    ap.add_argument("--scenes", default="50,200,800", help="training scene counts of the learning curve")
    ap.add_argument("--mlp-steps", type=int, default=1500)
    ap.add_argument("--attention-epochs", type=int, default=60)
    a = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(a.model, dtype=torch.float32).eval()
    proc = processor(a.model)
    xa, ya, ta, ea = load(a.train, a.per_episode, model, proc)
    xb, yb, tb, _ = load(a.val, a.per_episode, model, proc)
    print(f"training: {len(ya)} samples of {len(set(ea))} scenes; validation: {len(yb)} samples")
    # Ridge and the MLP read every input flattened; the attention probe reads tokens as they are.
    fa, fb = ({k: x[k].reshape(len(x[k]), -1) for k in INPUTS} for x in (xa, xb))
    print("| training scenes | input | ridge R^2 | MLP R^2 (training MSE, stds^2) |\n|---|---|---|---|")
    for n in [int(v) for v in a.scenes.split(",")]:
        keep = ea < n
        for k in INPUTS:
            mean, std = fa[k][keep].mean(0), fa[k][keep].std(0) + 1e-6
            za, zb = (fa[k][keep] - mean) / std, (fb[k] - mean) / std
            mlp, fit = mlp_r2(za, ya[keep], zb, yb, a.mlp_steps)
            print(f"| {n} | {k} | {ridge_r2(za, ya[keep], zb, yb):.3f} | {mlp:.3f} ({fit:.3f}) |", flush=True)
            if k == "pixels":
                # The control: the tool, always visible and unambiguous, read by the same probes.
                mlp, fit = mlp_r2(za, ta[keep], zb, tb, a.mlp_steps)
                print(f"| {n} | pixels -> tool x, y (control) | {ridge_r2(za, ta[keep], zb, tb):.3f} | {mlp:.3f} ({fit:.3f}) |")
    print("\n| training scenes | tokens read by the instruction's attention | R^2 unseen scenes | R^2 training scenes |\n|---|---|---|---|")
    for n in [int(v) for v in a.scenes.split(",")]:
        keep = ea < n
        for k in TOKEN_INPUTS:
            mean, std = xa[k][keep].mean((0, 1)), xa[k][keep].std((0, 1)) + 1e-6
            za, zb = (xa[k][keep] - mean) / std, (xb[k] - mean) / std
            val, fit = attention_r2(za, xa["words"][keep], ya[keep], zb, xb["words"], yb, a.attention_epochs)
            print(f"| {n} | {k} | {val:.3f} | {fit:.3f} |", flush=True)


if __name__ == "__main__":
    main()
