"""Model backends behind one small protocol: load once, then `generate(items, ...)` per batch.

`transformers` is the default and runs anywhere (CPU included); `vllm` is an optional extra
imported only when a spec asks for it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from actors.inputs import ModelInputs
from actors.loading import ResolvedModel
from schemas.spec import ModelSpec, SamplingSpec


@dataclass
class Generation:
    text: str
    output_tokens: int
    finished: bool  # the model stopped by itself (False: cut at max_new_tokens)


class Backend(Protocol):
    def generate(
        self, items: list[ModelInputs], sampling: SamplingSpec, max_new_tokens: int, schema: dict | None
    ) -> list[Generation]: ...


def make_backend(resolved: ResolvedModel, spec: ModelSpec) -> Backend:
    if spec.backend == "vllm":
        from actors.vllm_backend import VllmBackend  # optional extra, imported lazily

        return VllmBackend(resolved, spec)
    return TransformersBackend(resolved, spec)


class TransformersBackend:
    """One replica in this actor: on CPU, on the one GPU Ray gave it (or a share of one), or
    sharded over the k GPUs Ray gave it (actors/sharding.py plans the device map)."""

    def __init__(self, resolved: ResolvedModel, spec: ModelSpec):
        import torch

        from actors.adapters import PixelNorm, adapter_for
        from actors.loading import load_processor

        self._torch = torch
        path = resolved.local_path()
        self.processor = load_processor(path, resolved.trust_remote_code)
        self.tokenizer = self.processor.tokenizer
        # Ray sets CUDA_VISIBLE_DEVICES to this actor's GPUs: they are cuda:0..k-1 here.
        self.n_gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        self.device = torch.device("cuda:0" if self.n_gpus else "cpu")
        self.dtype = _dtype(spec.dtype, self.device, torch)
        self.model = load_model(path, resolved.trust_remote_code, self.dtype, self.n_gpus, spec.quantization)
        self.adapter = adapter_for(resolved.model_type)
        self.norm = PixelNorm.of(self.processor.image_processor)
        config = self.model.config
        text_config = getattr(config, "text_config", config)
        self.vocab_size = text_config.vocab_size
        self.eos_ids = _eos_ids(self.model.generation_config, self.tokenizer)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos_ids[0]
        self._grammar = None

    def grammar(self):
        if self._grammar is None:
            from actors.constrained import GrammarCompiler

            self._grammar = GrammarCompiler(self.tokenizer, self.vocab_size)
        return self._grammar

    def generate(self, items, sampling, max_new_tokens, schema):
        torch = self._torch
        batch = self.adapter.collate(items, self.pad_id, self.norm, self.device, self.dtype)
        kwargs = dict(max_new_tokens=max_new_tokens, pad_token_id=self.pad_id, eos_token_id=self.eos_ids)
        if sampling.temperature > 0:
            kwargs.update(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p)
            if sampling.seed is not None:
                torch.manual_seed(sampling.seed)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        if schema is not None:
            kwargs["logits_processor"] = [self.grammar().logits_processor(schema)]
        with torch.inference_mode():
            sequences = self.model.generate(**batch, **kwargs)
        new_tokens = sequences[:, batch["input_ids"].shape[1] :].cpu()
        return [self._decode(row) for row in new_tokens]

    def _decode(self, tokens) -> Generation:
        ids = tokens.tolist()
        finished = False
        for index, token in enumerate(ids):
            if token in self.eos_ids:
                ids, finished = ids[:index], True
                break
        while ids and ids[-1] == self.pad_id:
            ids.pop()
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        return Generation(text=text, output_tokens=len(ids) + (1 if finished else 0), finished=finished)


def load_model(path: str, trust_remote_code: bool, dtype, n_gpus: int, quantization: str | None):
    """The model on CPU (n_gpus 0), on cuda:0, or split over cuda:0..n_gpus-1: vision tower,
    projector and embeddings on the first, layers evenly, norm and head on the last."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    kwargs: dict = {"dtype": dtype, "trust_remote_code": trust_remote_code}
    if quantization:
        kwargs["quantization_config"] = quantization_config(quantization)
    if n_gpus > 1:
        from actors.sharding import meta_model, plan_device_map

        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        kwargs["device_map"] = plan_device_map(meta_model(config, trust_remote_code), n_gpus)
    elif n_gpus == 1:
        kwargs["device_map"] = {"": 0}  # straight to the GPU, never a full copy in host memory
    return AutoModelForImageTextToText.from_pretrained(path, **kwargs).eval()


def quantization_config(kind: str):
    """int8 / int4 weight-only quantisation with optimum-quanto (CPU and CUDA)."""
    try:
        import optimum.quanto  # noqa: F401
    except ImportError:
        raise ImportError(
            f"model.quantization: {kind} needs optimum-quanto: pip install 'tessera[quantization]'"
        ) from None
    from transformers import QuantoConfig

    return QuantoConfig(weights=kind)


def _dtype(name: str, device, torch):
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return getattr(torch, name)


def _eos_ids(generation_config, tokenizer) -> list[int]:
    eos = generation_config.eos_token_id if generation_config.eos_token_id is not None else tokenizer.eos_token_id
    return list(eos) if isinstance(eos, (list, tuple)) else [eos]
