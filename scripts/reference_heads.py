"""PyTorch re-implementation of the reference pipeline's policy heads, with its module names.

The reference (see docs: shared/reference/stage2-guide.md) trains two modules whose state dicts it
saves as `sensor_encoder` and `action_expert` in one `torch.save` dict:

- SensorEncoder: Conv1d stack (k3, s2, BatchNorm, GELU) -> 2-layer transformer encoder (no
  positional information) -> mean pool -> MLP (about 47 M parameters at the reference sizes).
- ActionExpert: concat fusion Linear(vl + sensor -> d), sinusoidal timestep MLP, action embedding,
  4-layer transformer (no positional information over the horizon), output Linear (about 58 M).
- Cosine DDPM schedule (T 100) and the reference's DDIM sampler (x0 clamped to [-1, 1], "leading"
  timesteps; ours uses "trailing" ones).

Our Rust heads (src/policy) keep these names and add what the reference lacked (positional
embeddings, normalization); scripts/convert_reference_ckpt.py maps one to the other.

Importable: `SensorEncoder`, `ActionExpert`, `cosine_schedule`, `ddim_sample`,
`build_from_config(cfg)` (cfg in the layout of our PolicyConfig JSON, missing fields = reference
defaults) and `save_reference_checkpoint`. Run as a script it writes a reference checkpoint plus
fixed inputs and the modules' outputs on them (used by tests/policy/convert.rs):

    python scripts/reference_heads.py --config small.json --out DIR [--seed 0]
"""

import argparse
import json
import math
import os

import torch
from torch import nn

REFERENCE_CONFIG = {
    "vl_dim": 2048,
    "state_dim": 0,
    "sensor": {
        "window": 650,
        "in_channels": 1026,
        "conv_channels": [512, 1024, 1024, 1024],
        "d_model": 1024,
        "n_heads": 8,
        "n_layers": 2,
        "ff_dim": 4096,
        "out_dim": 3072,
        "dropout": 0.1,
    },
    "fusion": {"kind": "concat", "n_heads": 8},
    "expert": {
        "horizon": 8,
        "action_dim": 7,
        "d_model": 1024,
        "n_heads": 8,
        "n_layers": 4,
        "ff_dim": 4096,
        "dropout": 0.1,
    },
    "diffusion": {"train_steps": 100, "cosine_s": 0.008, "max_beta": 0.999, "default_ddim_steps": 10},
}


def merged_config(cfg=None):
    """The reference config with the entries of `cfg` (same nested layout) replacing defaults."""
    out = json.loads(json.dumps(REFERENCE_CONFIG))
    for key, value in (cfg or {}).items():
        if isinstance(value, dict):
            out[key].update(value)
        else:
            out[key] = value
    return out


def _encoder(d_model, n_heads, n_layers, ff_dim, dropout):
    layer = nn.TransformerEncoderLayer(d_model, n_heads, ff_dim, dropout, batch_first=True)
    return nn.TransformerEncoder(layer, n_layers, enable_nested_tensor=False)


class SensorEncoder(nn.Module):
    """Windows [B, T, C] -> features [B, out_dim]."""

    def __init__(self, in_channels=1026, conv_channels=(512, 1024, 1024, 1024), d_model=1024,
                 n_heads=8, n_layers=2, ff_dim=4096, out_dim=3072, dropout=0.1):
        super().__init__()
        layers, c = [], in_channels
        for out in conv_channels:
            layers += [nn.Conv1d(c, out, 3, stride=2, padding=1), nn.BatchNorm1d(out), nn.GELU()]
            c = out
        assert c == d_model, "last conv channel count must equal d_model"
        self.conv = nn.Sequential(*layers)
        self.transformer = _encoder(d_model, n_heads, n_layers, ff_dim, dropout)
        self.proj = nn.Sequential(nn.Linear(d_model, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))

    def forward(self, x):
        h = self.conv(x.transpose(1, 2)).transpose(1, 2)
        return self.proj(self.transformer(h).mean(dim=1))


class SinusoidalPosEmb(nn.Module):
    """Timesteps [B] -> [B, dim]: [sin(t f), cos(t f)], f_i = exp(-ln(1e4) i / (dim/2 - 1))."""

    def __init__(self, dim):
        super().__init__()
        self.dim = dim

    def forward(self, t):
        half = self.dim // 2
        freqs = torch.exp(torch.arange(half, device=t.device, dtype=torch.float32) * (-math.log(10000.0) / max(half - 1, 1)))
        args = t.float()[:, None] * freqs[None, :]
        return torch.cat([args.sin(), args.cos()], dim=-1)


class ActionExpert(nn.Module):
    """Denoiser eps(x_t [B, H, A], t [B], vl [B, vl_dim], sensor [B, sensor_dim]) -> [B, H, A]."""

    def __init__(self, vl_dim=2048, sensor_dim=3072, action_dim=7, d_model=1024, n_heads=8,
                 n_layers=4, ff_dim=4096, dropout=0.1):
        super().__init__()
        self.fusion = nn.Linear(vl_dim + sensor_dim, d_model)
        self.time_mlp = nn.Sequential(SinusoidalPosEmb(d_model), nn.Linear(d_model, d_model), nn.GELU(),
                                      nn.Linear(d_model, d_model))
        self.action_embed = nn.Linear(action_dim, d_model)
        self.transformer = _encoder(d_model, n_heads, n_layers, ff_dim, dropout)
        self.output = nn.Linear(d_model, action_dim)

    def condition(self, vl, sensor):
        return self.fusion(torch.cat([vl, sensor], dim=-1))

    def denoise(self, x_t, t, cond):
        h = self.action_embed(x_t) + self.time_mlp(t)[:, None, :] + cond[:, None, :]
        return self.output(self.transformer(h))

    def forward(self, x_t, t, vl, sensor):
        return self.denoise(x_t, t, self.condition(vl, sensor))


def build_from_config(cfg=None):
    """(SensorEncoder, ActionExpert) at the sizes of `cfg` (our PolicyConfig JSON layout)."""
    c = merged_config(cfg)
    s, e = c["sensor"], c["expert"]
    sensor = SensorEncoder(s["in_channels"], s["conv_channels"], s["d_model"], s["n_heads"], s["n_layers"],
                           s["ff_dim"], s["out_dim"], s["dropout"])
    expert = ActionExpert(c["vl_dim"], s["out_dim"], e["action_dim"], e["d_model"], e["n_heads"], e["n_layers"],
                          e["ff_dim"], e["dropout"])
    return sensor, expert


def cosine_schedule(train_steps=100, s=0.008, max_beta=0.999):
    """(betas, alphas_cumprod) as float64 lists (Nichol & Dhariwal cosine schedule)."""
    f = lambda t: math.cos(((t / train_steps) + s) / (1 + s) * math.pi / 2) ** 2
    betas = [min(1 - f(i + 1) / f(i), max_beta) for i in range(train_steps)]
    acc, cum = 1.0, []
    for b in betas:
        acc *= 1 - b
        cum.append(acc)
    return betas, cum


def ddim_timesteps(t_max, steps, spacing):
    """Descending DDIM timesteps: "leading" i * (T // steps) (the reference's, first t = 90 of
    100 at 10 steps) or "trailing" round(arange(T, 0, -T / steps)) - 1 (ours, diffusers', first
    t = T - 1, where alpha_bar ~ 0; Python's round() ties to even like numpy's)."""
    if spacing == "leading":
        return [i * (t_max // steps) for i in range(steps)][::-1]
    if spacing == "trailing":
        delta = (t_max - t_max / steps) - t_max  # numpy's arange(T, 0, -T / steps) arithmetic
        return [round(t_max + i * delta) - 1 for i in range(steps)]
    raise ValueError(f"spacing {spacing!r}: expected 'leading' or 'trailing'")


@torch.no_grad()
def ddim_sample(expert, cond, x, steps, alphas_cumprod, clamp=True, spacing="leading"):
    """Deterministic DDIM from noise `x` [B, H, A], x0 clamped to [-1, 1] with `clamp`.
    `spacing="leading"` is the reference's; `"trailing"` is ours (ours clamps x0 to the training
    actions' normalized range, which is [-1, 1] under the identity normalization of a converted
    reference checkpoint)."""
    ts = ddim_timesteps(len(alphas_cumprod), steps, spacing)
    for k, t in enumerate(ts):
        a_t = alphas_cumprod[t]
        a_prev = alphas_cumprod[ts[k + 1]] if k + 1 < len(ts) else 1.0
        eps = expert.denoise(x, torch.full((x.shape[0],), t, dtype=torch.long, device=x.device), cond)
        x0 = (x - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
        if clamp:
            x0 = x0.clamp(-1, 1)
        x = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * eps
    return x


def save_reference_checkpoint(path, sensor, expert, epoch=20):
    """Writes the reference's checkpoint dict (torch.save)."""
    torch.save({"epoch": epoch, "sensor_encoder": sensor.state_dict(), "action_expert": expert.state_dict()}, path)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help="JSON config (our PolicyConfig layout; missing = reference sizes)")
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--ddim-steps", type=int, default=5)
    args = ap.parse_args()
    cfg = merged_config(json.load(open(args.config)) if args.config else None)
    torch.manual_seed(args.seed)
    sensor, expert = build_from_config(cfg)
    # Non-trivial BatchNorm running statistics, as a trained checkpoint has.
    for m in sensor.modules():
        if isinstance(m, nn.BatchNorm1d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    sensor.eval()
    expert.eval()
    os.makedirs(args.out, exist_ok=True)
    save_reference_checkpoint(os.path.join(args.out, "reference.pt"), sensor, expert)

    s, e, b = cfg["sensor"], cfg["expert"], args.batch
    g = torch.Generator().manual_seed(args.seed + 1)
    inputs = {
        "sensor": torch.randn(b, s["window"], s["in_channels"], generator=g),
        "vl": torch.randn(b, cfg["vl_dim"], generator=g),
        "x_t": torch.randn(b, e["horizon"], e["action_dim"], generator=g),
        "t": torch.randint(0, cfg["diffusion"]["train_steps"], (b,), generator=g),
        "noise": torch.randn(b, e["horizon"], e["action_dim"], generator=g),
    }
    d = cfg["diffusion"]
    _, cum = cosine_schedule(d["train_steps"], d["cosine_s"], d["max_beta"])
    with torch.no_grad():
        feat = sensor(inputs["sensor"])
        cond = expert.condition(inputs["vl"], feat)
        outputs = {
            "sensor_feature": feat,
            "cond": cond,
            "eps": expert.denoise(inputs["x_t"], inputs["t"], cond),
            "ddim": ddim_sample(expert, cond, inputs["noise"], args.ddim_steps, cum, clamp=True, spacing="trailing"),
        }
    from safetensors.torch import save_file
    save_file({**inputs, **outputs}, os.path.join(args.out, "io.safetensors"),
              metadata={"ddim_steps": str(args.ddim_steps)})
    n_s = sum(p.numel() for p in sensor.parameters())
    n_e = sum(p.numel() for p in expert.parameters())
    print(json.dumps({"sensor_encoder_params": n_s, "action_expert_params": n_e}))


if __name__ == "__main__":
    main()
