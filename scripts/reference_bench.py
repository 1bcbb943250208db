"""The Python way of the Stage 2 step, for `vla_finetune bench` to be compared against.

transformers `Qwen2_5_VLForConditionalGeneration` (random init from the exported `config.json`,
or `--model-dir` weights) + peft LoRA (r, alpha 2r, dropout 0.05 on the LLM's q/k/v/o), bf16
autocast over bf16 weights (or f32), gradient checkpointing (non-reentrant), the reference heads
of scripts/reference_heads.py at the exported `heads.json` sizes, diffusion loss, torch AdamW.
Same inputs as ours: `vla_finetune bench ... --export DIR` writes config.json, heads.json and
inputs.safetensors (input_ids, attention_mask, pixel_values, image_grid_thw, sensor, actions).

Cases: `step` per cache mode (off: full VL forward; vision: cached vision-tower output fed through
transformers' `mm_encoder_outputs`; features: cached pooled features, heads-only step;
features-refresh: same as off), `vision_cache` (images/s through the vision tower), `act` (heads
DDIM sampling). Each case runs in a fresh Python process; peaks are torch.cuda.max_memory_allocated
and ru_maxrss of that process. Prints the same JSON records as ours with "impl": "reference".

    python scripts/reference_bench.py --setup DIR [--kinds step,vision-cache,act]
        [--cache off,vision,features] [--checkpointing on] [--precision bf16] [--device cuda]
        [--rank 8] [--steps 3] [--warmup 1] [--ddim-steps 10] [--json out.json]
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import reference_heads as ref  # noqa: E402

LORA_TARGETS = r".*\.layers\.\d+\.self_attn\.(q_proj|k_proj|v_proj|o_proj)"
UNITS = {"step": "samples/s", "vision_cache": "images/s", "act": "chunks/s"}


def load_setup(setup):
    from safetensors.torch import load_file
    spec = json.load(open(os.path.join(setup, "spec.json")))
    heads = json.load(open(os.path.join(setup, "heads.json")))
    return spec, heads, load_file(os.path.join(setup, "inputs.safetensors"))


def build_vl(case, setup, dtype, device):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    if case.get("model_dir"):
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(case["model_dir"], dtype=dtype)
        return model.to(device)
    cfg = Qwen2_5_VLConfig.from_pretrained(setup)
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2_5_VLForConditionalGeneration._from_config(cfg, dtype=dtype)
    return model


def add_lora(model, rank):
    from peft import LoraConfig, get_peft_model
    cfg = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.05, target_modules=LORA_TARGETS)
    return get_peft_model(model, cfg)


def diffusion_loss(sensor_enc, expert, vl, sensor, actions, cum, gen_device):
    """The reference's loss: uniform t, standard-normal noise, MSE on the predicted noise."""
    b = actions.shape[0]
    t = torch.randint(0, len(cum), (b,), device=gen_device)
    noise = torch.randn_like(actions)
    a = torch.tensor(cum, device=actions.device, dtype=torch.float32)[t][:, None, None]
    x_t = a.sqrt() * actions + (1 - a).sqrt() * noise
    eps = expert(x_t, t, vl, sensor_enc(sensor))
    return torch.nn.functional.mse_loss(eps.float(), noise)


def pooled(h, mask):
    m = mask.float()[..., None]
    return (h.float() * m).sum(1) / m.sum(1)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device, warmup, steps, fn):
    for i in range(warmup):
        fn(i)
    ms = []
    for i in range(steps):
        sync(device)
        t0 = time.perf_counter()
        fn(warmup + i)
        sync(device)
        ms.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(ms)


def run_case(case, setup):
    spec, heads_cfg, inputs = load_setup(setup)
    device = torch.device(case["device"])
    bf16 = case["precision"] == "bf16"
    dtype = torch.bfloat16 if bf16 else torch.float32
    autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)  # noqa: E731
    x = {k: v.to(device) for k, v in inputs.items()}
    grid = x["image_grid_thw"].long()
    b = x["input_ids"].shape[0]
    result = {"loss": None, "tokens_per_sample": 0, "trainable_params": 0, "lora_params": 0, "heads_params": 0}
    torch.manual_seed(0)
    sensor_enc, expert = ref.build_from_config(heads_cfg)
    sensor_enc, expert = sensor_enc.to(device), expert.to(device)
    d = ref.merged_config(heads_cfg)["diffusion"]
    _, cum = ref.cosine_schedule(d["train_steps"], d["cosine_s"], d["max_beta"])

    if case["kind"] == "act":
        sensor_enc.eval(), expert.eval()
        vl = torch.randn(b, heads_cfg["vl_dim"], device=device)

        def act(i):
            with torch.no_grad(), autocast():
                cond = expert.condition(vl, sensor_enc(x["sensor"]))
                noise = torch.randn(b, *x["actions"].shape[1:], device=device)
                ref.ddim_sample(expert, cond, noise, case["ddim_steps"], cum, clamp=True, spacing="trailing")
        ms, per = timed(device, case["warmup"], case["steps"], act), b
    elif case["kind"] == "vision_cache":
        model = build_vl(case, setup, dtype, device).eval()
        pix = x["pixel_values"].to(dtype)

        def vis(i):
            with torch.no_grad(), autocast():
                model.model.get_image_features(pix, grid)
        ms, per = timed(device, case["warmup"], case["steps"], vis), b * spec["views"]
    else:
        ms, per = run_step(case, setup, x, grid, dtype, device, autocast, sensor_enc, expert, cum, result), b
    result.update({
        "impl": "reference", **case,
        "samples_per_s": per * 1e3 / ms, "unit": UNITS[case["kind"]], "step_ms": ms,
        "peak_accel_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
        "peak_host_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    })
    return result


def run_step(case, setup, x, grid, dtype, device, autocast, sensor_enc, expert, cum, result):
    mode = case["cache"]
    ids, mask = x["input_ids"], x["attention_mask"]
    heads_params = [p for m in (sensor_enc, expert) for p in m.parameters()]
    groups = [{"params": heads_params, "weight_decay": 0.01}]
    model = build_vl(case, setup, dtype, device)
    mm_types = (ids == model.config.image_token_id).int()
    pix = x["pixel_values"].to(dtype)
    cached_vision = cached_pooled = None
    if mode == "features":
        with torch.no_grad(), autocast():
            out = model.model(input_ids=ids, attention_mask=mask, pixel_values=pix, image_grid_thw=grid,
                              mm_token_type_ids=mm_types)
            cached_pooled = pooled(out.last_hidden_state, mask)
        del model
        lora_params = []
    else:
        if case["checkpointing"]:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model = add_lora(model, case["lora_rank"])
        model.train()
        if mode == "vision":
            with torch.no_grad(), autocast():
                cached_vision = model.base_model.model.model.get_image_features(pix, grid, return_dict=True)
        lora_params = [p for p in model.parameters() if p.requires_grad]
        groups.append({"params": lora_params, "weight_decay": 0.0})
        result["tokens_per_sample"] = ids.shape[1]
    result["lora_params"] = sum(p.numel() for p in lora_params)
    result["heads_params"] = sum(p.numel() for p in heads_params)
    result["trainable_params"] = result["lora_params"] + result["heads_params"]
    opt = torch.optim.AdamW(groups, lr=1e-4)
    sensor_enc.train(), expert.train()
    last = {}

    def step(i):
        opt.zero_grad(set_to_none=True)
        with autocast():
            if cached_pooled is not None:
                vl = cached_pooled
            else:
                vlm = model.base_model.model.model
                kw = {"mm_encoder_outputs": {"image": cached_vision}} if cached_vision is not None else {"pixel_values": pix}
                out = vlm(input_ids=ids, attention_mask=mask, image_grid_thw=grid, mm_token_type_ids=mm_types, **kw)
                vl = pooled(out.last_hidden_state, mask)
            loss = diffusion_loss(sensor_enc, expert, vl, x["sensor"], x["actions"], cum, device)
        loss.backward()
        opt.step()
        last["loss"] = loss.item()

    ms = timed(device, case["warmup"], case["steps"], step)
    result["loss"] = last["loss"]
    return ms


def cases(args, spec):
    base = {"model": spec["model"], "model_dir": args.model_dir, "views": spec["views"],
            "image_size": spec["image_size"], "batch": spec["batch"], "lora_rank": args.rank, "cache": None,
            "checkpointing": args.checkpointing == "on", "precision": args.precision, "device": args.device,
            "steps": args.steps, "warmup": args.warmup, "ddim_steps": args.ddim_steps}
    out = []
    for kind in args.kinds.split(","):
        kind = kind.replace("-", "_")
        if kind == "step":
            out += [{**base, "kind": "step", "cache": c} for c in args.cache.split(",")]
        elif kind in UNITS:
            out.append({**base, "kind": kind, "checkpointing": False})
        else:
            sys.exit(f"--kinds: unknown kind `{kind}` (expected step, vision-cache, act)")
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--setup", required=True, help="folder written by `vla_finetune bench --export`")
    ap.add_argument("--model-dir", help="load these weights instead of random init")
    ap.add_argument("--kinds", default="step,vision-cache,act")
    ap.add_argument("--cache", default="off,vision,features")
    ap.add_argument("--checkpointing", choices=["on", "off"], default="on")
    ap.add_argument("--precision", choices=["f32", "bf16"], default="bf16")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--ddim-steps", type=int, default=10)
    ap.add_argument("--json", help="write the records here")
    ap.add_argument("--one-case", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one_case:
        print(json.dumps(run_case(json.loads(args.one_case), args.setup)))
        return
    for name in ("spec.json", "heads.json", "inputs.safetensors", "config.json"):
        if not os.path.exists(os.path.join(args.setup, name)):
            sys.exit(f"--setup {args.setup}: no {name} (write it with `vla_finetune bench --export DIR`)")
    spec = json.load(open(os.path.join(args.setup, "spec.json")))
    records = []
    for case in cases(args, spec):
        print(f"reference: {case['kind']} {case['cache'] or ''}", file=sys.stderr)
        out = subprocess.run([sys.executable, __file__, "--setup", args.setup, "--one-case", json.dumps(case)],
                             stdout=subprocess.PIPE, text=True)
        if out.returncode != 0:
            sys.exit(f"reference case {case['kind']} {case['cache']} failed (exit {out.returncode})")
        records.append(json.loads([l for l in out.stdout.splitlines() if l.startswith("{")][-1]))
    for r in records:
        print(f"reference {r['kind']:<12} {str(r['cache'] or '-'):<16} {r['samples_per_s']:>10.3f} {r['unit']:<9} "
              f"{r['step_ms']:>10.1f} ms  host {r['peak_host_bytes'] / 2**20:.0f} MiB"
              + (f"  accel {r['peak_accel_bytes'] / 2**20:.0f} MiB" if r["peak_accel_bytes"] is not None else ""))
    if args.json:
        json.dump(records, open(args.json, "w"), indent=2)


if __name__ == "__main__":
    main()
