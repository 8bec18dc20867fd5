"""Where each part of a model goes when one replica spans k GPUs: a pure function of the
model's structure (built on the meta device, no weights) and k.

The shape, for any `AutoModelForImageTextToText` whose decoder is a stack of layers:
- GPU 0: the vision tower, the projector, the token embeddings, the rotary embedding and
  anything else outside the decoder stack (the image tokens are merged into the embeddings
  there, so no image tensor ever crosses a GPU);
- the decoder layers split into k contiguous runs whose lengths differ by at most one (the
  extra layers go to the middle GPUs, since the first and last also hold the embeddings and
  the head);
- GPU k-1: the final norm and the LM head, unless the head shares its weight with the
  embeddings (tied), in which case it stays with them on GPU 0.

Why not accelerate's `infer_auto_device_map`: it fills GPUs greedily, in registration order,
up to a per-GPU memory budget it has to be told (or guesses), so the split depends on
free memory at load time and is uneven by design (it reserves room for the largest layer on
each device). A replica's pipeline runs at the pace of its fullest GPU; an even split is
what we want and is easy to state, test and reason about. accelerate still does the
dispatch (`from_pretrained(device_map=...)` places the weights and adds the hooks that move
activations between GPUs).
"""

from __future__ import annotations

from collections.abc import Sequence

# Names transformers' decoder stacks give their final norm.
FINAL_NORM_NAMES = ("norm", "final_layernorm", "ln_f", "final_norm", "norm_f")


def even_split(n_layers: int, n_devices: int) -> list[int]:
    """Layers per device, contiguous, differing by at most one; extras go to middle devices."""
    if n_devices < 1:
        raise ValueError("need at least one device")
    base, extra = divmod(n_layers, n_devices)
    counts = [base] * n_devices
    middle_first = list(range(1, n_devices - 1)) + [n_devices - 1, 0] if n_devices > 2 else list(range(n_devices - 1, -1, -1))
    for device in middle_first[:extra]:
        counts[device] += 1
    return counts


def decoder_layers(model) -> tuple[str, str]:
    """(name of the decoder stack, name of its layer list): the stack is the module that owns
    the input embeddings; its layers are its ModuleList of a `_no_split_modules` class."""
    import torch

    names = {id(module): name for name, module in model.named_modules()}
    embeddings = names[id(model.get_input_embeddings())]
    stack_name = embeddings.rsplit(".", 1)[0] if "." in embeddings else ""
    stack = model.get_submodule(stack_name)
    no_split = set(getattr(model, "_no_split_modules", None) or [])
    candidates = [
        (name, child)
        for name, child in stack.named_children()
        if isinstance(child, torch.nn.ModuleList) and len(child)
    ]
    layers = [(name, child) for name, child in candidates if type(child[0]).__name__ in no_split] or candidates
    if not layers:
        raise ValueError(f"{type(model).__name__}: no decoder layer list under {stack_name or 'the model'}")
    name, _ = max(layers, key=lambda item: len(item[1]))
    return stack_name, _join(stack_name, name)


def plan_device_map(model, n_devices: int) -> dict[str, int]:
    """A device map ({module or parameter name: GPU index}) for `model` over `n_devices`."""
    names = {id(module): name for name, module in model.named_modules()}
    stack_name, layers_name = decoder_layers(model)
    layers = model.get_submodule(layers_name)
    last = n_devices - 1
    head = model.get_output_embeddings()
    tied = head is not None and ties_embeddings(model)

    device_map: dict[str, int] = {}
    start = 0
    for device, count in enumerate(even_split(len(layers), n_devices)):
        for index in range(start, start + count):
            device_map[f"{layers_name}.{index}"] = device
        start += count

    stack = model.get_submodule(stack_name)
    for name, child in stack.named_children():
        full = _join(stack_name, name)
        if full != layers_name:
            device_map[full] = last if name in FINAL_NORM_NAMES else 0
    _own_tensors(stack, stack_name, device_map, 0)

    head_name = names[id(head)] if head is not None else None
    # Everything off the path from the root to the decoder stack: GPU 0 (vision, projector…).
    path = _ancestors(stack_name)
    for ancestor in path:
        module = model.get_submodule(ancestor)
        for name, _ in module.named_children():
            full = _join(ancestor, name)
            if full == head_name or full in path or full == stack_name:
                continue
            device_map[full] = 0
        _own_tensors(module, ancestor, device_map, 0)
    if head_name is not None:
        device_map[head_name] = 0 if tied else last
    return device_map


def ties_embeddings(model) -> bool:
    """Whether the LM head shares its weight with the input embeddings (as loaded: on the
    meta device the tie is only in the config)."""
    if model.get_output_embeddings().weight is model.get_input_embeddings().weight:
        return True
    config = model.config
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return any(bool(getattr(c, "tie_word_embeddings", False)) for c in (config, text_config))


def devices_of(device_map: dict[str, int], prefix: str) -> set[int]:
    """The devices holding `prefix` or anything under it."""
    return {device for name, device in device_map.items() if name == prefix or name.startswith(prefix + ".")}


def layer_counts(device_map: dict[str, int], layers_name: str, n_devices: int) -> list[int]:
    counts = [0] * n_devices
    for name, device in device_map.items():
        rest = name[len(layers_name) + 1 :] if name.startswith(layers_name + ".") else ""
        if rest.isdigit():
            counts[device] += 1
    return counts


def _own_tensors(module, prefix: str, device_map: dict[str, int], device: int) -> None:
    """Parameters and buffers held by `module` itself (e.g. LLaVA-NeXT's image_newline)."""
    for name, _ in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
        device_map[_join(prefix, name)] = device


def _ancestors(name: str) -> Sequence[str]:
    """"" and every proper prefix of a dotted name: "a.b.c" -> ["", "a", "a.b"]."""
    parts = name.split(".") if name else []
    return [".".join(parts[:i]) for i in range(len(parts))]


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def meta_model(config, trust_remote_code: bool = False):
    """The model of `config` with every tensor on the meta device: its structure, no memory."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForImageTextToText

    with init_empty_weights():
        return AutoModelForImageTextToText.from_config(config, trust_remote_code=trust_remote_code)
