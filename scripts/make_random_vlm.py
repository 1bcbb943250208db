"""A Qwen2.5-VL model folder (Hugging Face layout) with random weights, for benchmarks of the
real training job at shapes no downloadable model has (no weights can be downloaded here).

    python scripts/make_random_vlm.py --config DIR --out DIR [--seed 0]

--config: a folder holding a Qwen2.5-VL config.json, e.g. the one `vla_finetune bench --model
reduced --export DIR` writes (special-token ids of the fixture tokenizer). The weights come
from transformers' own initialisation, saved in bf16 with save_pretrained; tokenizer.json is
the test fixture's (tests/fixtures/vlm/tokenizer.json), whose ids the config uses.
"""
import argparse
import os
import shutil

import torch
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True, help="folder with a Qwen2.5-VL config.json")
    ap.add_argument("--out", required=True, help="model folder to write")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    cfg = Qwen2_5_VLConfig.from_pretrained(a.config)
    torch.manual_seed(a.seed)
    model = Qwen2_5_VLForConditionalGeneration(cfg).eval()
    model.to(torch.bfloat16).save_pretrained(a.out)
    shutil.copy(os.path.join(ROOT, "tests/fixtures/vlm/tokenizer.json"), os.path.join(a.out, "tokenizer.json"))
    n = sum(p.numel() for p in model.parameters())
    print(f"{a.out}: {n / 1e6:.1f} M parameters (bf16)")


if __name__ == "__main__":
    main()
