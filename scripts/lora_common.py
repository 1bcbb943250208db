"""Shared pieces of the LoRA/PEFT fixture scripts: the tiny random Qwen2.5-VL config.

Pinned stack (the project venv): torch 2.11.0, transformers 5.23.0, peft 0.21.2.
"""
import torch
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration


def tiny_config():
    """A few-KB Qwen2.5-VL: 2 LLM layers (GQA 4:2), 2 vision blocks, odd-ish widths."""
    return Qwen2_5_VLConfig(
        text_config=dict(
            hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=128, max_position_embeddings=256,
            rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]},
        ),
        vision_config=dict(
            depth=2, hidden_size=16, intermediate_size=24, num_heads=2, out_hidden_size=32,
            patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=56,
            fullatt_block_indexes=[1],
        ),
    )


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return Qwen2_5_VLForConditionalGeneration(tiny_config()).eval()


def linear_paths(model):
    """Every nn.Linear's module path, in named_modules order (what VisitLinears visits)."""
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
