"""Device-map planning for a replica over k GPUs (actors/sharding.py), on models of real
shapes built on the meta device (structure only, no memory, no download): every parameter
placed, decoder layers split into even contiguous runs, the vision tower and projector with
the embeddings on GPU 0, the final norm and head on the last GPU (with the embeddings when
tied)."""

from __future__ import annotations

import pytest

from actors.sharding import (
    decoder_layers,
    devices_of,
    even_split,
    layer_counts,
    meta_model,
    plan_device_map,
    ties_embeddings,
)

CLIP_L_336 = {
    "model_type": "clip_vision_model", "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
    "num_attention_heads": 16, "image_size": 336, "patch_size": 14, "projection_dim": 768,
}


def llava_next_7b():
    """llava-v1.6-mistral-7b: CLIP ViT-L/14-336 + Mistral-7B."""
    from transformers import LlavaNextConfig

    text = {
        "model_type": "mistral", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 32064, "tie_word_embeddings": False,
    }
    return LlavaNextConfig(text_config=text, vision_config=CLIP_L_336, image_token_index=32000)


def minimax_vl_01_like():
    """MiniMax-VL-01's shape as LLaVA-NeXT: CLIP-L/336 + an 80-layer MoE text model (the
    transformers `minimax` architecture: 6144 hidden, 64 heads, 32 experts)."""
    from transformers import LlavaNextConfig

    text = {
        "model_type": "minimax", "hidden_size": 6144, "intermediate_size": 9216, "num_hidden_layers": 80,
        "num_attention_heads": 64, "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 200064,
        "num_local_experts": 32, "num_experts_per_tok": 2, "tie_word_embeddings": False,
    }
    return LlavaNextConfig(text_config=text, vision_config=CLIP_L_336, image_token_index=200025)


def qwen2_vl_2b():
    """Qwen2-VL-2B-Instruct (tied word embeddings)."""
    from transformers import Qwen2VLConfig

    text = {
        "hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28, "num_attention_heads": 12,
        "num_key_value_heads": 2, "vocab_size": 151936, "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
    }
    vision = {"depth": 32, "embed_dim": 1280, "hidden_size": 1536, "num_heads": 16, "mlp_ratio": 4, "patch_size": 14}
    return Qwen2VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True)


def smolvlm_2b():
    """SmolVLM-Instruct (Idefics3): SigLIP so400m-style tower + a 24-layer Llama."""
    from transformers import Idefics3Config

    text = {
        "model_type": "llama", "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 24,
        "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 49155, "tie_word_embeddings": False,
    }
    vision = {"hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 27, "num_attention_heads": 16,
              "image_size": 384, "patch_size": 14}
    return Idefics3Config(text_config=text, vision_config=vision, scale_factor=3)


CASES = [
    # (config, GPUs, the vision part, layers expected per GPU)
    (llava_next_7b, 2, "model.vision_tower", [16, 16]),
    (llava_next_7b, 4, "model.vision_tower", [8, 8, 8, 8]),
    (qwen2_vl_2b, 2, "model.visual", [14, 14]),
    (qwen2_vl_2b, 3, "model.visual", [9, 10, 9]),
    (smolvlm_2b, 2, "model.vision_model", [12, 12]),
    (smolvlm_2b, 5, "model.vision_model", [4, 5, 5, 5, 5]),
    (minimax_vl_01_like, 8, "model.vision_tower", [10] * 8),
]


@pytest.mark.parametrize("build, gpus, vision, expected", CASES, ids=lambda c: getattr(c, "__name__", str(c)))
def test_plan_shape(build, gpus, vision, expected):
    model = meta_model(build())
    plan = plan_device_map(model, gpus)
    stack, layers = decoder_layers(model)

    assert layer_counts(plan, layers, gpus) == expected
    # contiguous runs, in order
    order = [plan[f"{layers}.{i}"] for i in range(len(model.get_submodule(layers)))]
    assert order == sorted(order)
    # every parameter and buffer has exactly one device
    for name, _ in list(model.named_parameters()) + list(model.named_buffers()):
        owners = [key for key in plan if name == key or name.startswith(key + ".")]
        assert len(owners) == 1, (name, owners)
    # the vision tower, the projector and the embeddings on GPU 0; the final norm on the last
    assert devices_of(plan, vision) == {0}
    assert plan[f"{stack}.embed_tokens"] == 0
    assert plan[f"{stack}.norm"] == gpus - 1
    head = plan["lm_head"]
    assert head == (0 if ties_embeddings(model) else gpus - 1)


def test_projector_and_loose_parameters_stay_with_the_vision_tower():
    model = meta_model(llava_next_7b())
    plan = plan_device_map(model, 4)
    assert plan["model.multi_modal_projector"] == 0
    assert plan["model.image_newline"] == 0  # a bare parameter of LlavaNextModel


def test_qwen2_vl_2b_head_is_tied_to_embeddings():
    model = meta_model(qwen2_vl_2b())
    assert ties_embeddings(model) and not ties_embeddings(meta_model(llava_next_7b()))
    assert plan_device_map(model, 2)["lm_head"] == 0


def test_one_device_holds_everything():
    plan = plan_device_map(meta_model(smolvlm_2b()), 1)
    assert set(plan.values()) == {0}


@pytest.mark.parametrize("layers, devices", [(32, 3), (80, 8), (7, 4), (3, 5), (61, 8)])
def test_even_split(layers, devices):
    counts = even_split(layers, devices)
    assert sum(counts) == layers and max(counts) - min(counts) <= 1
    if layers % devices and devices > 2:
        assert counts[0] == layers // devices  # the first GPU also holds vision + embeddings
