#!/usr/bin/env python3
"""Full-model PEFT fixture for Qwen2.5-VL (peft 0.21.2, transformers 5.23.0, torch 2.11.0).

Creates a LoRA adapter with Python peft on the tiny fixture model tests/fixtures/vlm/tiny_a
(rsLoRA, non-zero B via `init_lora_weights=False`, targets in the LLM *and* the vision tower),
saves it to tests/fixtures/vlm/lora_a/ and writes the reference last hidden state (after the
final norm) of the adapted model for the fixture cases with images, in f32:
tests/fixtures/vlm/lora_a/<case>.f32.safetensors.

Run from the repository root: .venv/bin/python scripts/gen_vlm_lora_fixtures.py
"""
import json
import os
import sys

import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file
from transformers import (
    PreTrainedTokenizerFast,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2VLImageProcessor,
    Qwen2VLVideoProcessor,
)
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gen_vlm_fixtures as vf  # noqa: E402

BASE = os.path.join(vf.OUT, "tiny_a")
ADAPTER = os.path.join(vf.OUT, "lora_a")
REF_CASES = ["two_images", "one_image"]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "qkv", "gate_proj", "down_proj"]


def processor():
    hf_tok = PreTrainedTokenizerFast(tokenizer_file=os.path.join(vf.OUT, "tokenizer.json"),
                                     eos_token="<|im_end|>", pad_token="<|endoftext|>")
    ip = Qwen2VLImageProcessor(min_pixels=vf.MIN_PIXELS, max_pixels=vf.MAX_PIXELS)
    return Qwen2_5_VLProcessor(image_processor=ip, tokenizer=hf_tok,
                               video_processor=Qwen2VLVideoProcessor(), chat_template=vf.CHAT_TEMPLATE)


def case_inputs(proc, case):
    """The processor's inputs for a fixture case (batch of one)."""
    imgs, text = vf.CASES[case]
    pil = [Image.open(os.path.join(vf.OUT, "images", n)).convert("RGB") for n in imgs]
    messages = [{"role": "user", "content": [{"type": "image"} for _ in imgs] + [{"type": "text", "text": text}]}]
    prompt = proc.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return proc(text=[prompt], images=pil or None, return_tensors="pt")


def last_hidden(inner, inputs):
    """Last hidden state after the final norm `[len, hidden]` of the (adapted) model."""
    with torch.no_grad():
        out = inner.model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                          pixel_values=inputs.get("pixel_values"), image_grid_thw=inputs.get("image_grid_thw"),
                          mm_token_type_ids=inputs["mm_token_type_ids"])
    return out.last_hidden_state[0].float().contiguous()


def main():
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(BASE, dtype=torch.float32).eval()
    cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, use_rslora=True, target_modules=TARGETS,
                     init_lora_weights=False)
    torch.manual_seed(7)
    pm = get_peft_model(model, cfg).eval()
    pm.save_pretrained(ADAPTER)
    os.remove(os.path.join(ADAPTER, "README.md"))  # peft's model card, not needed
    # Portable base path instead of this machine's absolute one.
    cpath = os.path.join(ADAPTER, "adapter_config.json")
    with open(cpath) as f:
        c = json.load(f)
    c["base_model_name_or_path"] = "tests/fixtures/vlm/tiny_a"
    with open(cpath, "w") as f:
        json.dump(c, f, indent=2, sort_keys=True)
    proc = processor()
    for case in REF_CASES:
        h = last_hidden(pm.base_model.model, case_inputs(proc, case))
        save_file({"last_hidden_state": h}, os.path.join(ADAPTER, f"{case}.f32.safetensors"))
    print("adapter keys:", len(pm.state_dict()), "cases:", REF_CASES)


if __name__ == "__main__":
    main()
