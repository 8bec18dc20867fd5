"""The embedded default model: a tiny random-weight LLaVA-NeXT, built locally, no network.

It has the architecture of MiniMax-VL-01 scaled down (CLIP-style ViT, MLP projector, a
small decoder LLM, dynamic-resolution "anyres" tiling with a thumbnail): 56-px tiles instead
of 336, and the 28 grid points of MiniMax-VL-01 divided by six (every multiple of 56 up to
336 with at most 18 tiles). Its text is meaningless; it exists so that every code path a
real checkpoint takes runs air-gapped, on a laptop, in seconds.

`ensure_tiny_model()` builds it once into a cache directory (into a temporary folder, then
renamed into place, so concurrent builders never see half a model) and returns the path.
Builds are seeded: two builds give identical weights and tokenizer.

Other families, to prove the pipeline is model-agnostic, are built the same way by
actors/tiny_families.py: `builtin:tiny-qwen2-vl` and `builtin:tiny-idefics3` (SmolVLM).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

TINY_MODEL_URI = "builtin:tiny"
# Bump when anything below changes: the cache directory is keyed by it.
TINY_MODEL_VERSION = "3"


def _builders() -> dict[str, tuple[str, Callable[[Path], None]]]:
    """builtin URI -> (cache folder name, builder)."""
    from actors import tiny_families

    return {
        TINY_MODEL_URI: (f"tiny-llava-next-v{TINY_MODEL_VERSION}", _build),
        **tiny_families.BUILDERS,
    }


TINY_MODELS = (TINY_MODEL_URI, "builtin:tiny-qwen2-vl", "builtin:tiny-idefics3")

TILE = 56
PATCH = 14
MAX_TILES_PER_SIDE = 6
MAX_TILES = 18
SEED = 20261122

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>", "<image>", "<video>", "<|im_start|>", "<|im_end|>"]

# Seeds the BPE merges: the words the prompts and JSON outputs use most.
_TOKENIZER_CORPUS = """
You are a careful content moderation assistant. Look at the image and answer in JSON.
{"verdict": "allow", "categories": {"violence": {"flagged": false, "confidence": 0.1}},
"rationale": "The image shows a landscape with no policy violations."}
Describe the image. A photo of a cat sitting on a red chair next to a window.
Extract the document: title, date, parties, fields, tables, full text. Invoice number 12345.
true false null allow review block caption objects text document type summary
0 1 2 3 4 5 6 7 8 9 10 100 0.5 0.25 0.75 0.9 {} [] "" : , the a an of and in on with is are
"""


def tiny_grid_pinpoints() -> list[list[int]]:
    """MiniMax-VL-01's grid (multiples of 336 up to 2016, at most 18 tiles) divided by six."""
    return [
        [h * TILE, w * TILE]
        for h in range(1, MAX_TILES_PER_SIDE + 1)
        for w in range(1, MAX_TILES_PER_SIDE + 1)
        if h * w <= MAX_TILES
    ]


def cache_root() -> Path:
    return Path(
        os.environ.get("TESSERA_CACHE_DIR")
        or os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "tessera")
    )


def tiny_model_cache_dir(uri: str = TINY_MODEL_URI) -> Path:
    return cache_root() / "models" / _builders()[uri][0]


def ensure_tiny_model(cache_dir: Path | None = None, uri: str = TINY_MODEL_URI) -> Path:
    """Return the directory of the built tiny model `uri`, building it first if needed."""
    target = Path(cache_dir) if cache_dir else tiny_model_cache_dir(uri)
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".building-", dir=target.parent))
    try:
        _builders()[uri][1](staging)
        try:
            os.rename(staging, target)
        except OSError:
            # Another process won the race and renamed its identical build into place first.
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def tiny_model_revision(path: Path) -> str:
    """A content hash of the built weights: the model revision recorded in results."""
    digest = hashlib.sha256()
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        digest.update((path / name).read_bytes())
    return digest.hexdigest()[:12]


def _build(out: Path) -> None:
    import torch
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
    )

    tokenizer = _build_tokenizer()
    vocab_size = len(tokenizer)
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=TILE,
        patch_size=PATCH,
        projection_dim=32,
    )
    text = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    config = LlavaNextConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_grid_pinpoints=tiny_grid_pinpoints(),
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
        projector_hidden_act="gelu",
    )
    torch.manual_seed(SEED)
    model = LlavaNextForConditionalGeneration(config).eval()
    model.generation_config.eos_token_id = text.eos_token_id
    model.generation_config.pad_token_id = text.pad_token_id
    model.generation_config.bos_token_id = text.bos_token_id
    model.save_pretrained(out)
    _build_processor(tokenizer).save_pretrained(out)
    (out / "TESSERA_TINY_MODEL.json").write_text(
        json.dumps({"version": TINY_MODEL_VERSION, "seed": SEED, "random_weights": True})
    )


def _build_tokenizer():
    return build_bpe_tokenizer(
        SPECIAL_TOKENS,
        bos_token="<s>",
        eos_token="<|im_end|>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
    )


def build_bpe_tokenizer(special_tokens: list[str], vocab_size: int = 512, **named_tokens):
    """A byte-level BPE tokenizer trained on a small fixed corpus (deterministic), with
    `special_tokens` first in its vocabulary; `named_tokens` (bos_token=…, pad_token=…,
    extra_special_tokens=…) name them for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token=named_tokens.get("unk_token")))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator([_TOKENIZER_CORPUS] * 4, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, padding_side="left", **named_tokens)


CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>\n"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _build_processor(tokenizer):
    from transformers import LlavaNextProcessor
    from transformers.models.llava_next.image_processing_pil_llava_next import (
        LlavaNextImageProcessorPil,
    )

    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": TILE},
        crop_size={"height": TILE, "width": TILE},
        image_grid_pinpoints=tiny_grid_pinpoints(),
        image_mean=[0.48145466, 0.4578275, 0.40821073],
        image_std=[0.26862954, 0.26130258, 0.27577711],
    )
    return LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=PATCH,
        vision_feature_select_strategy="default",
        chat_template=CHAT_TEMPLATE,
        num_additional_image_tokens=1,
    )
