#!/usr/bin/env python3
"""Generates tests/fixtures/lora/: a tiny random Qwen2.5-VL base model, LoRA adapters written
by Python peft (non-zero B) and each adapted layer's output on fixed inputs computed through the
PEFT-wrapped modules. The Rust tests load the adapters with our loader and must reproduce the
outputs.

Stack: torch 2.11.0, transformers 5.23.0, peft 0.21.2 (the project venv).
Run: .venv/bin/python scripts/gen_lora_fixtures.py
"""
import json
import math
import os
import shutil
import sys

import peft
import torch
import transformers
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file

sys.path.insert(0, os.path.dirname(__file__))
from lora_common import linear_paths, tiny_model  # noqa: E402

OUT = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "lora")

ADAPTERS = {
    # The reference's kind of adapter: suffix list on the attention projections.
    "peft_list": dict(r=4, lora_alpha=8, lora_dropout=0.05,
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
    # Full-match regex reaching into the vision tower, rsLoRA, non-integer alpha.
    "peft_regex": dict(r=2, lora_alpha=5.5, lora_dropout=0.0, use_rslora=True,
                       target_modules=r".*\.(mlp\.(gate_proj|down_proj)|attn\.qkv)"),
}


def make_adapter(name, kwargs, seed):
    model = tiny_model()
    paths = linear_paths(model)
    pm = get_peft_model(model, LoraConfig(**kwargs))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n or "lora_A" in n:  # non-zero B so the update matters
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    pm.eval()
    out_dir = os.path.join(OUT, name)
    shutil.rmtree(out_dir, ignore_errors=True)
    pm.save_pretrained(out_dir)
    os.remove(os.path.join(out_dir, "README.md"))  # PEFT's model card, not needed
    io = {}
    for path in paths:
        module = pm.base_model.model.get_submodule(path)
        if not hasattr(module, "lora_A"):
            continue
        x = torch.randn((2, 3, module.in_features), generator=g)
        with torch.no_grad():
            io[f"{path}.x"] = x
            io[f"{path}.y"] = module(x)
    save_file(io, os.path.join(OUT, f"{name}_io.safetensors"))
    return out_dir


def main():
    os.makedirs(OUT, exist_ok=True)
    base = tiny_model()
    base_dir = os.path.join(OUT, "base")
    shutil.rmtree(base_dir, ignore_errors=True)
    base.save_pretrained(base_dir)
    with open(os.path.join(OUT, "linears.json"), "w") as f:
        json.dump(linear_paths(base), f, indent=1)

    for i, (name, kwargs) in enumerate(ADAPTERS.items()):
        make_adapter(name, kwargs, seed=100 + i)

    # The same list adapter with the pre-4.52 key layout (`base_model.model.model.layers.*`).
    src = os.path.join(OUT, "peft_list")
    old = os.path.join(OUT, "peft_list_old_layout")
    shutil.rmtree(old, ignore_errors=True)
    os.makedirs(old)
    shutil.copy(os.path.join(src, "adapter_config.json"), old)
    tensors = load_file(os.path.join(src, "adapter_model.safetensors"))
    renamed = {k.replace("base_model.model.model.language_model.", "base_model.model.model."): v
               for k, v in tensors.items()}
    assert len(renamed) == len(tensors) and all(k not in tensors for k in renamed)
    save_file(renamed, os.path.join(old, "adapter_model.safetensors"), metadata={"format": "pt"})

    # PEFT's A initialisation after torch.manual_seed(1234): kaiming_uniform_(a=sqrt(5)).
    torch.manual_seed(1234)
    a = torch.empty(4, 32)
    torch.nn.init.kaiming_uniform_(a, a=math.sqrt(5))
    save_file({"lora_A": a}, os.path.join(OUT, "init_ref.safetensors"))

    with open(os.path.join(OUT, "VERSIONS"), "w") as f:
        f.write(f"torch {torch.__version__}\ntransformers {transformers.__version__}\npeft {peft.__version__}\n")


if __name__ == "__main__":
    main()
