"""Convert a reference pipeline stage-1 checkpoint to our policy heads checkpoint.

Input: a `torch.save` dict with the state dicts `sensor_encoder` and `action_expert` (the module
names of scripts/reference_heads.py), loaded with `weights_only=True` (no pickled code runs).
Output: one safetensors file with every tensor in f32 under `sensor_encoder.*` / `action_expert.*`
and the JSON metadata our loader checks (src/policy/heads_file.rs): config, cosine schedule,
normalization, stage 1.

Sizes are read from the weights. What the weights cannot tell (attention heads, sensor window,
action horizon, schedule length) comes from the reference defaults or `--config` (a partial JSON in
our PolicyConfig layout). The reference had no positional embeddings and no normalization: the
added `pos_embed` tensors are zero and the normalization is the identity, so the converted heads
compute exactly what the reference computed; pass `--stats` (our NormStats JSON) only if the
reference was trained on data normalized that way.

    python scripts/convert_reference_ckpt.py diffusion_epoch20.pt heads.safetensors [--config c.json] [--stats s.json]
"""

import argparse
import json
import os
import re
import sys

import torch
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import reference_heads as ref  # noqa: E402

META_KEY = "vla_finetune.policy_heads"
FORMAT_VERSION = 1


class ConvertError(Exception):
    pass


def _layers(sd, prefix):
    ids = {int(m.group(1)) for k in sd for m in [re.match(re.escape(prefix) + r"(\d+)\.", k)] if m}
    return sorted(ids)


def _need(sd, group, key):
    if key not in sd:
        raise ConvertError(f"`{group}` state dict has no `{key}` (not a reference checkpoint?)")
    return sd[key].shape


def infer_sizes(sensor, expert):
    """Sizes readable from the weights, in our config layout."""
    convs = [i for i in _layers(sensor, "conv.") if f"conv.{i}.weight" in sensor and sensor[f"conv.{i}.weight"].dim() == 3]
    if not convs:
        raise ConvertError("`sensor_encoder` has no conv layers (`conv.N.weight`)")
    s_attn = _need(sensor, "sensor_encoder", "transformer.layers.0.self_attn.in_proj_weight")
    e_embed = _need(expert, "action_expert", "action_embed.weight")
    out_dim = _need(sensor, "sensor_encoder", "proj.2.weight")[0]
    fusion_in = _need(expert, "action_expert", "fusion.weight")[1]
    return {
        "vl_dim": int(fusion_in - out_dim),
        "sensor": {
            "in_channels": int(sensor[f"conv.{convs[0]}.weight"].shape[1]),
            "conv_channels": [int(sensor[f"conv.{i}.weight"].shape[0]) for i in convs],
            "d_model": int(s_attn[1]),
            "n_layers": len(_layers(sensor, "transformer.layers.")),
            "ff_dim": int(_need(sensor, "sensor_encoder", "transformer.layers.0.linear1.weight")[0]),
            "out_dim": int(out_dim),
        },
        "expert": {
            "action_dim": int(e_embed[1]),
            "d_model": int(e_embed[0]),
            "n_layers": len(_layers(expert, "transformer.layers.")),
            "ff_dim": int(_need(expert, "action_expert", "transformer.layers.0.linear1.weight")[0]),
        },
    }


def resolve_config(inferred, given):
    """Reference defaults <- `given` <- inferred; a given value contradicting the weights fails."""
    for key, value in inferred.items():
        if isinstance(value, dict):
            for k, v in value.items():
                g = (given.get(key) or {}).get(k)
                if g is not None and g != v:
                    raise ConvertError(f"--config {key}.{k} = {g}, but the weights have {v}")
        elif given.get(key) is not None and given[key] != value:
            raise ConvertError(f"--config {key} = {given[key]}, but the weights have {value}")
    cfg = ref.merged_config(given)
    for key, value in inferred.items():
        if isinstance(value, dict):
            cfg[key].update(value)
        else:
            cfg[key] = value
    if cfg["fusion"]["kind"] != "concat":
        raise ConvertError(f"fusion.kind `{cfg['fusion']['kind']}`: the reference heads use `concat`")
    if cfg["state_dim"] != 0:
        raise ConvertError("state_dim must be 0: the reference heads take no robot state")
    return cfg


def check_against_reference(name, sd, module):
    """Strict name/shape comparison with the reference module built at the resolved sizes."""
    want = {k: v.shape for k, v in module.state_dict().items()}
    for k in sorted(set(sd) - set(want)):
        raise ConvertError(f"`{name}.{k}` is not a parameter of the reference {name} at the inferred sizes")
    for k in sorted(set(want) - set(sd)):
        raise ConvertError(f"`{name}.{k}` is missing from the checkpoint")
    for k in sorted(want):
        if tuple(sd[k].shape) != tuple(want[k]):
            raise ConvertError(f"`{name}.{k}` has shape {tuple(sd[k].shape)}, expected {tuple(want[k])}")
        if k.endswith("num_batches_tracked"):
            continue
        if not sd[k].is_floating_point():
            raise ConvertError(f"`{name}.{k}` has dtype {sd[k].dtype}, expected a float tensor")
        if not torch.isfinite(sd[k]).all():
            raise ConvertError(f"`{name}.{k}` has non-finite values")


def sensor_tokens(cfg):
    length = cfg["sensor"]["window"]
    for _ in cfg["sensor"]["conv_channels"]:
        length = (length - 1) // 2 + 1
    return length


def identity_stats(dim):
    return {"mean": [0.0] * dim, "std": [1.0] * dim, "min": [-1.0] * dim, "max": [1.0] * dim,
            "q01": [-1.0] * dim, "q99": [1.0] * dim}


def crate_version():
    cargo = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "Cargo.toml")
    try:
        m = re.search(r'^version\s*=\s*"([^"]+)"', open(cargo).read(), re.M)
        return m.group(1) if m else "unknown"
    except OSError:
        return "unknown"


def convert(src, dst, given_config=None, stats=None):
    """Converts `src` (reference .pt) to `dst` (our .safetensors); returns the metadata dict."""
    try:
        ckpt = torch.load(src, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for unreadable / unsafe files
        raise ConvertError(f"{src}: cannot load with torch.load(weights_only=True): {e}") from e
    if not isinstance(ckpt, dict) or not all(isinstance(ckpt.get(k), dict) for k in ("sensor_encoder", "action_expert")):
        raise ConvertError(f"{src}: expected a dict with state dicts `sensor_encoder` and `action_expert`")
    sensor_sd, expert_sd = ckpt["sensor_encoder"], ckpt["action_expert"]
    cfg = resolve_config(infer_sizes(sensor_sd, expert_sd), given_config or {})
    sensor, expert = ref.build_from_config(cfg)
    check_against_reference("sensor_encoder", sensor_sd, sensor)
    check_against_reference("action_expert", expert_sd, expert)

    tensors = {}
    for prefix, sd in (("sensor_encoder", sensor_sd), ("action_expert", expert_sd)):
        for k, v in sd.items():
            if not k.endswith("num_batches_tracked"):
                tensors[f"{prefix}.{k}"] = v.detach().to(torch.float32).contiguous()
    tensors["sensor_encoder.pos_embed"] = torch.zeros(sensor_tokens(cfg), cfg["sensor"]["d_model"])
    tensors["action_expert.pos_embed"] = torch.zeros(cfg["expert"]["horizon"], cfg["expert"]["d_model"])

    d = cfg["diffusion"]
    betas, cum = ref.cosine_schedule(d["train_steps"], d["cosine_s"], d["max_beta"])
    normalization = stats or {
        "sensor": {"mode": "mean_std", "stats": identity_stats(cfg["sensor"]["in_channels"])},
        "state": None,
        "action": {"mode": "mean_std", "stats": identity_stats(cfg["expert"]["action_dim"])},
    }
    meta = {
        "format": META_KEY,
        "format_version": FORMAT_VERSION,
        "crate_version": crate_version(),
        "libtorch_version": torch.__version__.split("+")[0],
        "stage": {"stage": "stage1"},
        "config": cfg,
        "schedule": {"betas": betas, "alphas_cumprod": cum},
        "normalization": normalization,
        "extra": {
            "converted_from": os.path.basename(src),
            "reference_epoch": ckpt.get("epoch"),
            "conversion": "reference heads; pos_embed zero (the reference had none)"
                          + ("; normalization from --stats" if stats else "; identity normalization"),
        },
    }
    tmp = dst + ".tmp"
    save_file(tensors, tmp, metadata={META_KEY: json.dumps(meta)})
    os.replace(tmp, dst)
    return meta


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src", help="reference checkpoint (torch.save dict)")
    ap.add_argument("dst", help="output .safetensors")
    ap.add_argument("--config", help="partial PolicyConfig JSON (heads, window, horizon, schedule)")
    ap.add_argument("--stats", help="NormStats JSON (sensor/state/action normalizers)")
    args = ap.parse_args()
    try:
        given = json.load(open(args.config)) if args.config else None
        stats = json.load(open(args.stats)) if args.stats else None
        meta = convert(args.src, args.dst, given, stats)
    except (ConvertError, OSError, json.JSONDecodeError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    print(json.dumps({"written": args.dst, "config": meta["config"]}))


if __name__ == "__main__":
    main()
