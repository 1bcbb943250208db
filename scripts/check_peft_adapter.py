#!/usr/bin/env python3
"""Checks an adapter folder written by our Rust code with Python peft (0.21.2, transformers
5.23.0): PeftModel.from_pretrained must load it onto the base model, every adapted layer must
reproduce the outputs Rust computed (file of `<path>.x` / `<path>.y` tensors), and re-saving it
with peft must give the same adapter_config.json and the same tensors. Exits 1 with the reason
on any mismatch.

Usage: check_peft_adapter.py BASE_DIR ADAPTER_DIR IO.safetensors
"""
import json
import os
import sys
import tempfile
import warnings

import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import Qwen2_5_VLForConditionalGeneration

warnings.filterwarnings("ignore")


def fail(msg):
    print(f"FAIL: {msg}")
    sys.exit(1)


def main():
    base_dir, adapter_dir, io_path = sys.argv[1:4]
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(base_dir, dtype=torch.float32)
    pm = PeftModel.from_pretrained(model, adapter_dir).eval()
    inner = pm.base_model.model
    io = load_file(io_path)
    paths = sorted(k[:-2] for k in io if k.endswith(".x"))
    adapted = sorted(n for n, m in inner.named_modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer"))
    if paths != adapted:
        fail(f"PEFT adapted {adapted}, Rust wrote outputs for {paths}")
    worst = 0.0
    for path in paths:
        with torch.no_grad():
            y = inner.get_submodule(path)(io[f"{path}.x"])
        ref = io[f"{path}.y"]
        err = ((y - ref).abs().max() / ref.abs().max().clamp_min(1e-12)).item()
        worst = max(worst, err)
        if err > 1e-5:
            fail(f"{path}: relative max error {err:.3e} > 1e-5")
    with tempfile.TemporaryDirectory() as tmp:
        pm.save_pretrained(tmp)
        with open(os.path.join(adapter_dir, "adapter_config.json")) as f:
            ours = json.load(f)
        with open(os.path.join(tmp, "adapter_config.json")) as f:
            theirs = json.load(f)
        for cfg in (ours, theirs):  # peft keeps a target list as a set: order is arbitrary
            if isinstance(cfg.get("target_modules"), list):
                cfg["target_modules"] = sorted(cfg["target_modules"])
        if ours != theirs:
            keys = sorted(set(ours) | set(theirs))
            diff = {k: (ours.get(k, "<absent>"), theirs.get(k, "<absent>")) for k in keys if ours.get(k, "<absent>") != theirs.get(k, "<absent>")}
            fail(f"adapter_config.json differs from what peft writes (ours, peft): {diff}")
        a = load_file(os.path.join(adapter_dir, "adapter_model.safetensors"))
        b = load_file(os.path.join(tmp, "adapter_model.safetensors"))
        if sorted(a) != sorted(b):
            fail(f"tensor keys differ: ours-only {sorted(set(a) - set(b))}, peft-only {sorted(set(b) - set(a))}")
        for k in a:
            if not torch.equal(a[k], b[k]):
                fail(f"tensor {k} changed on peft's re-save")
    print(f"OK: {len(paths)} LoRA layers, worst relative error {worst:.3e}, config and tensors identical on re-save")


if __name__ == "__main__":
    main()
