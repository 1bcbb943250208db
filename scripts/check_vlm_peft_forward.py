#!/usr/bin/env python3
"""Checks a full-model adapter written by our Rust code with Python peft (0.21.2,
transformers 5.23.0): PeftModel.from_pretrained on the base model, then the last hidden state
of a fixture case must match the one Rust computed (relative max error <= 1e-5) and the input
ids must be identical. When RUST_OUT also holds `pooled` (`[1, hidden]`, the mean of the last
hidden state over every token, our Pooling::All), peft's pooled feature must match it too.
Exits 1 with the reason on any mismatch.

Usage: check_vlm_peft_forward.py BASE_DIR ADAPTER_DIR CASE RUST_OUT.safetensors
"""
import os
import sys
import warnings

import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import Qwen2_5_VLForConditionalGeneration

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gen_vlm_lora_fixtures as lf  # noqa: E402

warnings.filterwarnings("ignore")


def main():
    base_dir, adapter_dir, case, rust_path = sys.argv[1:5]
    torch.set_num_threads(1)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(base_dir, dtype=torch.float32)
    pm = PeftModel.from_pretrained(model, adapter_dir).eval()
    n_adapted = sum(1 for _, m in pm.named_modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer"))
    rust = load_file(rust_path)
    inputs = lf.case_inputs(lf.processor(), case)
    if not torch.equal(inputs["input_ids"][0], rust["input_ids"][0]):
        print("FAIL: input ids differ between Rust and the transformers processor")
        sys.exit(1)
    ref = lf.last_hidden(pm.base_model.model, inputs)
    ours = rust["last_hidden_state"][0]
    err = ((ours - ref).abs().max() / ref.abs().max()).item()
    if err > 1e-5:
        print(f"FAIL: last_hidden_state relative max error {err:.3e} > 1e-5 ({n_adapted} adapted layers)")
        sys.exit(1)
    msg = f"OK {n_adapted} adapted layers, relative max error {err:.3e}"
    if "pooled" in rust:
        # One sample without padding: every token counts.
        ref_pooled = ref.mean(dim=0)
        perr = ((rust["pooled"][0] - ref_pooled).abs().max() / ref_pooled.abs().max()).item()
        if perr > 1e-5:
            print(f"FAIL: pooled features relative max error {perr:.3e} > 1e-5")
            sys.exit(1)
        msg += f", pooled relative max error {perr:.3e}"
    print(msg)


if __name__ == "__main__":
    main()
