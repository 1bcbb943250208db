#!/usr/bin/env python3
"""Generates the Qwen2.5-VL test fixtures under tests/fixtures/vlm/ (transformers==5.23.0).

For each tiny random model it writes a model directory (config.json in the nested 5.x layout,
model.safetensors in bf16 with the on-disk key layout `visual.*` / `model.layers.*` that
save_pretrained writes, like the published checkpoints; tokenizer.json) and, for each
case (a list of image files plus an instruction), the reference tensors computed by
transformers: the image processor's pixel_values/image_grid_thw, the chat-template input ids,
get_rope_index position ids, the vision tower's merged output and the last hidden state after
the final norm, in f32 and in bf16.

Run from the repository root: .venv/bin/python scripts/gen_vlm_fixtures.py
"""

import json
import os
import shutil

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import (
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2VLImageProcessor,
    Qwen2VLVideoProcessor,
)

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "vlm")

# The chat template shipped with Qwen2.5-VL-*-Instruct (chat_template.json).
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture "
    "{{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video "
    "{{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Qwen2's pre-tokenizer split pattern.
QWEN_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
SPECIALS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]
SENTENCES = [
    "You are a helpful assistant.",
    "Insert the needle into the phantom slowly.",
    "Move the gripper left and hold the force below 2 N.",
    "Pick up the red cube and place it in the bowl.",
    "What do the cameras show? Describe the scene.",
    "system user assistant",
]
MIN_PIXELS = 56 * 56
MAX_PIXELS = 28 * 28 * 20


def build_tokenizer(path):
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=330, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(SENTENCES, trainer)
    tok.add_special_tokens(SPECIALS)
    tok.save(path)
    return tok


def make_images():
    """Deterministic RGB images of odd sizes (img_d is downscaled, the others upscaled): gradients plus noise."""
    rng = np.random.default_rng(7)
    out = {}
    sizes = {"img_a.png": (45, 60), "img_b.png": (70, 101), "img_c.png": (90, 33), "img_d.png": (160, 120)}
    for name, (h, w) in sizes.items():
        y, x = np.mgrid[0:h, 0:w]
        base = np.stack([x * 255 / w, y * 255 / h, (x + y) * 127 / (w + h)], axis=-1)
        noise = rng.integers(-40, 40, size=(h, w, 3))
        out[name] = np.clip(base + noise, 0, 255).astype(np.uint8)
    return out


MODELS = {
    # Window attention with one full-attention block, GQA 2, three vision blocks, tied embeddings.
    "tiny_a": dict(
        text=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=1, rms_norm_eps=1e-6, max_position_embeddings=4096,
                  rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}),
        vision=dict(depth=3, hidden_size=16, intermediate_size=24, num_heads=2, out_hidden_size=32,
                    window_size=56, fullatt_block_indexes=[1], tokens_per_second=2, patch_size=14,
                    spatial_merge_size=2, temporal_patch_size=2),
        tie=True,
    ),
    # Odd sizes, window attention only (no full-attention block), GQA 3, three decoder layers, untied.
    "tiny_b": dict(
        text=dict(hidden_size=24, intermediate_size=40, num_hidden_layers=3, num_attention_heads=3,
                  num_key_value_heads=1, rms_norm_eps=1e-5, max_position_embeddings=4096,
                  rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [1, 2, 1]}),
        vision=dict(depth=2, hidden_size=24, intermediate_size=20, num_heads=3, out_hidden_size=24,
                    window_size=112, fullatt_block_indexes=[], tokens_per_second=2, patch_size=14,
                    spatial_merge_size=2, temporal_patch_size=2),
        tie=False,
    ),
}

CASES = {
    "one_image": (["img_a.png"], "Insert the needle slowly."),
    "two_images": (["img_b.png", "img_c.png"], "Pick up the red cube."),
    "three_images": (["img_c.png", "img_d.png", "img_b.png"], "What do the cameras show?"),
    # No image; digits, punctuation, a newline and non-ASCII text through the byte-level BPE.
    "text_only": ([], "Füge die Nadel ein: 2.5 mm,\nthen stop!  Ok?"),
}


def randomize(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "ln_q" in name:
                v = 1.0 + 0.2 * torch.randn(p.shape, generator=g)
            else:
                v = 0.15 * torch.randn(p.shape, generator=g)
            # bf16-representable so the bf16 file holds the f32 reference's exact weights.
            p.copy_(v.to(torch.bfloat16).to(torch.float32))


def unpatchify(pv, grid, ip):
    """The resized uint8 image behind the processor's pixel values (undoes patchify and normalize)."""
    _, gh, gw = grid.tolist()
    m, p, t = ip.merge_size, ip.patch_size, ip.temporal_patch_size
    x = pv.reshape(gh // m, gw // m, m, m, 3, t, p, p)[:, :, :, :, :, 0]
    x = x.permute(4, 0, 2, 5, 1, 3, 6).reshape(3, gh * p, gw * p)
    mean = torch.tensor(ip.image_mean).view(3, 1, 1)
    std = torch.tensor(ip.image_std).view(3, 1, 1)
    return ((x * std + mean) * 255).round().clamp(0, 255).to(torch.uint8).contiguous()


def write_processor_reference(ip, pil):
    """Per image: the processor's grid and resized pixels; full pixel values for the first image only
    (they are 1176 floats per patch, so the others are checked through the resized image)."""
    tensors = {}
    for i, (name, img) in enumerate(sorted(pil.items())):
        r = ip(images=[img], return_tensors="pt")
        tensors[f"{name}.image_grid_thw"] = r["image_grid_thw"][0].long().contiguous()
        tensors[f"{name}.resized"] = unpatchify(r["pixel_values"], r["image_grid_thw"][0], ip)
        if i == 0:
            tensors[f"{name}.pixel_values"] = r["pixel_values"].float().contiguous()
    save_file(tensors, os.path.join(OUT, "processor.safetensors"))


def write_parsed_configs():
    """How transformers reads the hand-transcribed 4.x-layout configs of the published 3B and 7B
    checkpoints (configs/*_instruct.json): the values our Config must find."""
    cdir = os.path.join(OUT, "configs")
    for name in sorted(os.listdir(cdir)):
        if not name.endswith("_instruct.json"):
            continue
        with open(os.path.join(cdir, name)) as f:
            cfg = Qwen2_5_VLConfig(**json.load(f))
        t, v = cfg.text_config, cfg.vision_config
        parsed = {
            "vocab_size": t.vocab_size, "hidden_size": t.hidden_size, "intermediate_size": t.intermediate_size,
            "num_hidden_layers": t.num_hidden_layers, "num_attention_heads": t.num_attention_heads,
            "num_key_value_heads": t.num_key_value_heads, "rms_norm_eps": t.rms_norm_eps,
            "rope_theta": t.rope_parameters["rope_theta"], "mrope_section": t.rope_parameters["mrope_section"],
            "tie_word_embeddings": cfg.tie_word_embeddings,
            "vision": {
                "depth": v.depth, "hidden_size": v.hidden_size, "intermediate_size": v.intermediate_size,
                "num_heads": v.num_heads, "in_channels": v.in_channels, "patch_size": v.patch_size,
                "spatial_merge_size": v.spatial_merge_size, "temporal_patch_size": v.temporal_patch_size,
                "window_size": v.window_size, "out_hidden_size": v.out_hidden_size,
                "fullatt_block_indexes": list(v.fullatt_block_indexes), "tokens_per_second": v.tokens_per_second,
            },
            "image_token_id": cfg.image_token_id, "video_token_id": cfg.video_token_id,
            "vision_start_token_id": cfg.vision_start_token_id, "vision_end_token_id": cfg.vision_end_token_id,
        }
        with open(os.path.join(cdir, name.replace(".json", ".parsed.json")), "w") as f:
            json.dump(parsed, f, indent=1)


def main():
    os.makedirs(os.path.join(OUT, "images"), exist_ok=True)
    images = make_images()
    for name, arr in images.items():
        Image.fromarray(arr).save(os.path.join(OUT, "images", name))
    pil = {n: Image.open(os.path.join(OUT, "images", n)).convert("RGB") for n in images}

    tok_path = os.path.join(OUT, "tokenizer.json")
    tok = build_tokenizer(tok_path)
    ids = {s: tok.token_to_id(s) for s in SPECIALS}
    vocab = tok.get_vocab_size() + 3  # a few unused rows, as real checkpoints have

    hf_tok = PreTrainedTokenizerFast(tokenizer_file=tok_path, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    image_processor = Qwen2VLImageProcessor(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    processor = Qwen2_5_VLProcessor(image_processor=image_processor, tokenizer=hf_tok,
                                    video_processor=Qwen2VLVideoProcessor(), chat_template=CHAT_TEMPLATE)

    manifest = {"min_pixels": MIN_PIXELS, "max_pixels": MAX_PIXELS, "models": {}, "cases": {}}
    for case, (imgs, text) in CASES.items():
        manifest["cases"][case] = {"images": imgs, "text": text}

    for mi, (mname, spec) in enumerate(MODELS.items()):
        mdir = os.path.join(OUT, mname)
        text_cfg = dict(spec["text"], vocab_size=vocab, tie_word_embeddings=spec["tie"],
                        bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"])
        cfg = Qwen2_5_VLConfig(
            text_config=text_cfg, vision_config=spec["vision"],
            image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
            vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
            tie_word_embeddings=spec["tie"],
        )
        torch.manual_seed(100 + mi)
        model = Qwen2_5_VLForConditionalGeneration(cfg).eval()
        randomize(model, 1000 + mi)
        model.to(torch.bfloat16).save_pretrained(mdir)
        shutil.copy(tok_path, os.path.join(mdir, "tokenizer.json"))
        manifest["models"][mname] = {"tie": spec["tie"]}

        for dtype_name, dtype in (("f32", torch.float32), ("bf16", torch.bfloat16)):
            ref = Qwen2_5_VLForConditionalGeneration.from_pretrained(mdir, dtype=dtype).eval()
            for case, (imgs, text) in CASES.items():
                messages = [{"role": "user", "content": [{"type": "image"} for _ in imgs]
                             + [{"type": "text", "text": text}]}]
                prompt = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
                inputs = processor(text=[prompt], images=[pil[n] for n in imgs] or None, return_tensors="pt")
                grid = inputs.get("image_grid_thw")
                with torch.no_grad():
                    pos, _ = ref.model.get_rope_index(
                        inputs["input_ids"], inputs["mm_token_type_ids"], image_grid_thw=grid,
                        attention_mask=inputs["attention_mask"])
                    out = ref.model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                                    pixel_values=inputs.get("pixel_values"), image_grid_thw=grid,
                                    mm_token_type_ids=inputs["mm_token_type_ids"])
                tensors = {"last_hidden_state": out.last_hidden_state[0].float().contiguous()}
                if imgs:
                    with torch.no_grad():
                        vis = ref.model.get_image_features(inputs["pixel_values"], grid)
                    tensors["vision_embeds"] = torch.cat(vis.pooler_output, dim=0).float().contiguous()
                if dtype_name == "f32" and mi == 0:
                    # Model-independent tensors, written once.
                    pre = {
                        "image_grid_thw": (grid if imgs else torch.zeros(0, 3)).long().contiguous(),
                        "input_ids": inputs["input_ids"][0].long().contiguous(),
                        "position_ids": pos[:, 0].long().contiguous(),
                    }
                    save_file(pre, os.path.join(OUT, f"{case}.inputs.safetensors"))
                    manifest["cases"][case]["prompt"] = prompt
                save_file(tensors, os.path.join(OUT, f"{mname}.{case}.{dtype_name}.safetensors"))

    write_processor_reference(image_processor, pil)
    write_parsed_configs()
    with open(os.path.join(OUT, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)


if __name__ == "__main__":
    main()
