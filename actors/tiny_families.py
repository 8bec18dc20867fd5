"""Tiny random-weight checkpoints of other model families, built locally like actors/tiny.py
(seeded, no network): they prove the pipeline is model-agnostic, end to end.

- `builtin:tiny-qwen2-vl`: Qwen2-VL (a ViT over 14-px patches merged 2x2, native dynamic
  resolution: the image is resized to a multiple of 28 px and sent as flattened patches plus
  `image_grid_thw`; M-RoPE in the decoder).
- `builtin:tiny-idefics3`: Idefics3 / SmolVLM (a SigLIP-style tower, pixel shuffle, the image
  split into a grid of tiles plus a global view, each tile padded with `pixel_attention_mask`).

Each has a BPE tokenizer with the family's special tokens and a chat template in its style.
The image processors are the PIL ones: the torchvision ones cannot be installed beside this
torch build. Qwen2-VL's video processor needs torchvision, so the processor is saved without
one; its adapter lays out video patches itself, as that video processor does.
"""

from __future__ import annotations

import json
from pathlib import Path

from actors.tiny import SEED, build_bpe_tokenizer

QWEN2_VL_URI = "builtin:tiny-qwen2-vl"
IDEFICS3_URI = "builtin:tiny-idefics3"
# Bump when a builder changes: the cache directories are keyed by it.
VERSION = "2"  # 2: the Qwen2-VL chat template renders video parts

QWEN2_VL_SPECIAL = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|image_pad|>", "<|video_pad|>",
]
QWEN2_VL_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

IDEFICS3_TILE = 56
IDEFICS3_GRID = 4  # at most 4x4 tiles per image (the processor names rows and columns up to 6)
IDEFICS3_SPECIAL = [
    "<|endoftext|>", "<unk>", "<|im_start|>", "<end_of_utterance>", "<fake_token_around_image>", "<image>",
    "<global-img>", *[f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)],
]
IDEFICS3_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}"
    "{% if message['content'] is string %}: {{ message['content'] }}"
    "{% else %}{% if message['content'][0]['type'] == 'image' %}:{% else %}: {% endif %}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


def _text_config(tokenizer, eos: str, **extra) -> dict:
    return {
        "vocab_size": len(tokenizer),
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 4096,
        "eos_token_id": tokenizer.convert_tokens_to_ids(eos),
        "pad_token_id": tokenizer.pad_token_id,
        "tie_word_embeddings": False,
        "bos_token_id": None,
        **extra,
    }


def build_qwen2_vl(out: Path) -> None:
    import torch
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tokenizer = build_bpe_tokenizer(
        QWEN2_VL_SPECIAL,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"},
    )
    ids = tokenizer.convert_tokens_to_ids
    text = _text_config(tokenizer, "<|im_end|>", rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]})
    vision = {"depth": 2, "embed_dim": 32, "hidden_size": 64, "num_heads": 2, "mlp_ratio": 2, "patch_size": 14,
              "spatial_merge_size": 2, "temporal_patch_size": 2}
    config = Qwen2VLConfig(
        text_config=text, vision_config=vision, image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"), vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"), tie_word_embeddings=False,
    )
    torch.manual_seed(SEED)
    model = Qwen2VLForConditionalGeneration(config).eval()
    _generation_ids(model, tokenizer)
    model.save_pretrained(out)
    # 4..64 merged tokens per image: resized to a multiple of 28 px between 56x56 and 224x224.
    image_processor = Qwen2VLImageProcessorPil(
        size={"shortest_edge": 56 * 56, "longest_edge": 224 * 224}, patch_size=14, temporal_patch_size=2, merge_size=2
    )
    # Qwen2VLProcessor itself cannot be built without torchvision (it type-checks its video
    # processor): save its parts and its name; actors/loading.py assembles them.
    tokenizer.chat_template = QWEN2_VL_TEMPLATE
    tokenizer.save_pretrained(out)
    image_processor.save_pretrained(out)
    (out / "processor_config.json").write_text(json.dumps({"processor_class": "Qwen2VLProcessor"}))
    (out / "chat_template.jinja").write_text(QWEN2_VL_TEMPLATE)
    _mark(out, QWEN2_VL_URI)


def build_idefics3(out: Path) -> None:
    import torch
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3Processor
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    tokenizer = build_bpe_tokenizer(
        IDEFICS3_SPECIAL,
        bos_token="<|im_start|>",
        eos_token="<end_of_utterance>",
        unk_token="<unk>",
        pad_token="<|endoftext|>",
        extra_special_tokens={"image_token": "<image>"},
    )
    text = _text_config(tokenizer, "<end_of_utterance>", model_type="llama", bos_token_id=tokenizer.bos_token_id)
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
              "image_size": IDEFICS3_TILE, "patch_size": 14}
    scale_factor = 2
    config = Idefics3Config(
        text_config=text, vision_config=vision, scale_factor=scale_factor,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"), tie_word_embeddings=False,
    )
    torch.manual_seed(SEED)
    model = Idefics3ForConditionalGeneration(config).eval()
    _generation_ids(model, tokenizer)
    model.save_pretrained(out)
    image_processor = Idefics3ImageProcessorPil(
        do_image_splitting=True,
        size={"longest_edge": IDEFICS3_GRID * IDEFICS3_TILE},
        max_image_size={"longest_edge": IDEFICS3_TILE},
    )
    image_seq_len = (IDEFICS3_TILE // 14) ** 2 // scale_factor**2
    Idefics3Processor(
        image_processor=image_processor, tokenizer=tokenizer, image_seq_len=image_seq_len, chat_template=IDEFICS3_TEMPLATE
    ).save_pretrained(out)
    _mark(out, IDEFICS3_URI)


def _generation_ids(model, tokenizer) -> None:
    text = model.config.get_text_config()
    model.generation_config.eos_token_id = text.eos_token_id
    model.generation_config.pad_token_id = text.pad_token_id
    model.generation_config.bos_token_id = getattr(text, "bos_token_id", None)


def _mark(out: Path, uri: str) -> None:
    (out / "TESSERA_TINY_MODEL.json").write_text(json.dumps({"uri": uri, "version": VERSION, "seed": SEED, "random_weights": True}))


BUILDERS = {
    QWEN2_VL_URI: (f"tiny-qwen2-vl-v{VERSION}", build_qwen2_vl),
    IDEFICS3_URI: (f"tiny-idefics3-v{VERSION}", build_idefics3),
}
