"""GPU benchmark: items/s and GPU busy fraction of the transformers and vLLM backends, run as
tessera jobs on one GPU, against the reference loop (one item at a time: processor ->
`model.generate` -> decode), on a random-weight model with the real shape of a 2B-class VLM.

    python -m benchmarks.gpu_bench [--model qwen2-vl-2b|smolvlm-2b] [--items 256]
        [--max-new-tokens 64] [--backends loop,transformers,vllm] [--out result.json]

No download: the checkpoint is built locally (real layer sizes and vocabulary, seeded random
weights, the tiny family's tokenizer and chat template with the real processor's pixel
limits). Every item generates exactly --max-new-tokens tokens on every backend (min tokens =
max tokens), so the work is equal. GPU busy fraction: NVML's utilisation counter (share of
time a kernel was running) sampled every 100 ms while each backend runs (needs
`nvidia-ml-py`, the `gpu` extra; without it the fraction is reported as null).

Needs CUDA; elsewhere it says so and exits with status 2. vLLM is measured where it is
importable (it needs an environment of its own: docs/scaling.md). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

MODELS = ("qwen2-vl-2b", "smolvlm-2b")
BACKENDS = ("loop", "transformers", "vllm")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=MODELS, default="qwen2-vl-2b")
    parser.add_argument("--items", type=int, default=256)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--image-size", default="640x480", help="WIDTHxHEIGHT of the synthetic images")
    parser.add_argument("--backends", default=",".join(BACKENDS))
    parser.add_argument("--workdir", help="where the checkpoint and corpus go (default: a temp dir, removed)")
    parser.add_argument("--out", help="also write the JSON result here")
    args = parser.parse_args(argv)
    args.backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    unknown = set(args.backends) - set(BACKENDS)
    if unknown:
        parser.error(f"unknown backends: {', '.join(sorted(unknown))} (known: {', '.join(BACKENDS)})")
    width, _, height = args.image_size.partition("x")
    args.image_size = (int(width), int(height))
    return args


def real_shape_config(name: str, token_ids: dict[str, int]):
    """The architecture of a real 2B-class VLM, with the special-token ids of our tokenizer."""
    if name == "qwen2-vl-2b":  # Qwen2-VL-2B-Instruct
        from transformers import Qwen2VLConfig

        text = {
            "hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28, "num_attention_heads": 12,
            "num_key_value_heads": 2, "vocab_size": 151936, "max_position_embeddings": 32768,
            "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]}, "rope_theta": 1000000.0,
            "eos_token_id": token_ids["eos"], "pad_token_id": token_ids["pad"], "bos_token_id": None,
        }
        vision = {"depth": 32, "embed_dim": 1280, "hidden_size": 1536, "num_heads": 16, "mlp_ratio": 4,
                  "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2}
        return Qwen2VLConfig(
            text_config=text, vision_config=vision, tie_word_embeddings=True, image_token_id=token_ids["image"],
            video_token_id=token_ids["video"], vision_start_token_id=token_ids["vision_start"],
            vision_end_token_id=token_ids["vision_end"],
        )
    if name == "smolvlm-2b":  # SmolVLM-Instruct (Idefics3)
        from transformers import Idefics3Config

        text = {
            "model_type": "llama", "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 24,
            "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 49155, "max_position_embeddings": 16384,
            "rope_theta": 273768.0, "eos_token_id": token_ids["eos"], "pad_token_id": token_ids["pad"],
            "tie_word_embeddings": False,
        }
        vision = {"hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 27, "num_attention_heads": 16,
                  "image_size": 384, "patch_size": 14}
        return Idefics3Config(text_config=text, vision_config=vision, scale_factor=3, image_token_id=token_ids["image"])
    raise ValueError(f"unknown model {name!r} (known: {', '.join(MODELS)})")


_TINY = {"qwen2-vl-2b": "builtin:tiny-qwen2-vl", "smolvlm-2b": "builtin:tiny-idefics3"}


def token_ids(name: str) -> dict[str, int]:
    from actors.loading import load_processor
    from actors.tiny import ensure_tiny_model

    tokenizer = load_processor(str(ensure_tiny_model(uri=_TINY[name]))).tokenizer
    ids = tokenizer.convert_tokens_to_ids
    if name == "qwen2-vl-2b":
        return {"eos": ids("<|im_end|>"), "pad": ids("<|endoftext|>"), "image": ids("<|image_pad|>"),
                "video": ids("<|video_pad|>"), "vision_start": ids("<|vision_start|>"), "vision_end": ids("<|vision_end|>")}
    return {"eos": ids("<end_of_utterance>"), "pad": ids("<|endoftext|>"), "image": ids("<image>")}


def build_checkpoint(name: str, out: Path, device: str = "cuda") -> Path:
    """Random weights of the real shape (seeded), plus the tiny family's tokenizer and
    template with the real model's image-processor limits."""
    import torch
    from transformers import AutoModelForImageTextToText

    from actors.tiny import ensure_tiny_model

    tiny = ensure_tiny_model(uri=_TINY[name])
    out.mkdir(parents=True, exist_ok=True)
    for file in tiny.iterdir():
        if not file.name.endswith(".safetensors") and file.name not in ("config.json", "generation_config.json"):
            shutil.copy(file, out / file.name)
    processor_config = json.loads((out / "preprocessor_config.json").read_text())
    if name == "qwen2-vl-2b":
        processor_config["size"] = {"shortest_edge": 56 * 56, "longest_edge": 28 * 28 * 1280}
        processor_config.update(min_pixels=56 * 56, max_pixels=28 * 28 * 1280)
    else:
        processor_config["size"] = {"longest_edge": 4 * 384}
        processor_config["max_image_size"] = {"longest_edge": 384}
    (out / "preprocessor_config.json").write_text(json.dumps(processor_config, indent=2))
    if name == "smolvlm-2b":
        processor = json.loads((out / "processor_config.json").read_text())
        processor["image_seq_len"] = 81
        (out / "processor_config.json").write_text(json.dumps(processor, indent=2))
    config = real_shape_config(name, token_ids(name))
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForImageTextToText.from_config(config, dtype=torch.bfloat16)
    model.generation_config.eos_token_id = config.get_text_config().eos_token_id
    model.generation_config.pad_token_id = config.get_text_config().pad_token_id
    model.save_pretrained(out)
    del model
    return out


def write_corpus(folder: Path, items: int, size: tuple[int, int]) -> Path:
    import numpy as np
    from PIL import Image

    media = folder / "media"
    media.mkdir(parents=True, exist_ok=True)
    rng = np.random.RandomState(0)
    rows = []
    for index in range(items):
        path = media / f"{index:05d}.jpg"
        Image.fromarray(rng.randint(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path, quality=90)
        rows.append(json.dumps({"id": f"item-{index:05d}", "uri": str(path)}))
    manifest = folder / "manifest.jsonl"
    manifest.write_text("\n".join(rows) + "\n")
    return manifest


class BusySampler:
    """Mean NVML utilisation of GPU 0 (0..1) while running; None without NVML."""

    def __init__(self, interval_s: float = 0.1):
        self.interval_s, self.samples, self._stop = interval_s, [], threading.Event()
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml, self._handle = pynvml, pynvml.nvmlDeviceGetHandleByIndex(0)
        except Exception:  # noqa: BLE001 - no NVML: report null, not a crash
            self._nvml = None

    def __enter__(self) -> "BusySampler":
        if self._nvml is not None:
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.samples.append(self._nvml.nvmlDeviceGetUtilizationRates(self._handle).gpu / 100.0)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._nvml is not None:
            self._thread.join()

    @property
    def fraction(self) -> float | None:
        return round(sum(self.samples) / len(self.samples), 3) if self.samples else None


PROMPT = "Describe the image."


def run_loop(checkpoint: Path, manifest: Path, max_new_tokens: int) -> dict:
    """The reference loop: one item at a time, the processor on the GPU process's CPU."""
    import torch
    from PIL import Image
    from transformers import AutoModelForImageTextToText

    from actors.loading import load_processor
    from pipeline.prepare import build_chat_text

    processor = load_processor(str(checkpoint))
    model = AutoModelForImageTextToText.from_pretrained(str(checkpoint), dtype=torch.bfloat16, device_map={"": 0}).eval()
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    text = build_chat_text(processor, PROMPT, 1)
    encode = _processor_call(processor, model.config.model_type)
    started = time.perf_counter()
    with BusySampler() as busy, torch.inference_mode():
        for row in rows:
            inputs = encode(text, Image.open(row["uri"]).convert("RGB"))
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False)
            processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        torch.cuda.synchronize()
    wall = time.perf_counter() - started
    del model
    torch.cuda.empty_cache()
    return {"items": len(rows), "wall_s": round(wall, 2), "items_per_s": round(len(rows) / wall, 3), "gpu_busy": busy.fraction}


def _processor_call(processor, model_type: str):
    """text, image -> generate() kwargs on cuda:0: the model's processor, as a user calls it;
    where it cannot be built (Qwen2-VL without torchvision) the adapter, which gives the
    same tensors (tests/test_families.py)."""
    import torch

    if callable(processor):
        def encode(text, image):
            inputs = processor(text=[text], images=[image], return_tensors="pt").to("cuda")
            inputs["pixel_values"] = inputs["pixel_values"].to(torch.bfloat16)
            return inputs

        return encode
    from actors.adapters import PixelNorm, adapter_for

    adapter, norm = adapter_for(model_type), PixelNorm.of(processor.image_processor)

    def encode(text, image):
        item = adapter.prepare(processor, [image], "image", text)
        return adapter.collate([item], processor.tokenizer.pad_token_id, norm, torch.device("cuda:0"), torch.bfloat16)

    return encode


def run_pipeline(backend: str, checkpoint: Path, manifest: Path, out: Path, args) -> dict:
    """A tessera job on a local Ray cluster with this machine's GPU: CPU decode overlapping
    inference, batches in flight; items/s over the job's streaming part."""
    import ray

    from pipeline.run import run_job
    from schemas.spec import parse_spec

    engine = {"engine_kwargs": {"max_model_len": 16384}} if backend == "vllm" else {}
    spec = parse_spec({
        "name": f"gpu-bench-{backend}",
        "input": {"manifest": str(manifest)},
        "output": {"path": str(out / f"results-{backend}"), "mode": "overwrite", "rows_per_file": 32},
        "model": {"path": str(checkpoint), "backend": backend, "gpus_per_replica": 1, "replicas": 1,
                  "batch_size": args.batch_size, "max_batch_tokens": 1 << 20, "dtype": "bfloat16", **engine},
        "task": {"prompt": PROMPT, "sampling": {"max_new_tokens": args.max_new_tokens, "reask": False}},
        "media": {"isolation": "none"},
    })
    ray.shutdown()
    ray.init(include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    try:
        with BusySampler() as busy:
            summary = run_job(spec)
    finally:
        ray.shutdown()
    timeline = summary["timeline"]
    first_t, first_rows = timeline[0]
    last_t, last_rows = timeline[-1]
    steady = (last_rows - first_rows) / (last_t - first_t) if last_t > first_t else None
    return {
        "items": summary["processed"], "ok": summary["ok"], "wall_s": summary["wall_s"],
        "items_per_s": summary["throughput_rows_per_s"], "items_per_s_after_first_file": round(steady, 3) if steady else None,
        "output_tokens": summary["tokens"]["output"], "gpu_busy": busy.fraction,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("gpu_bench: no CUDA device here (torch.cuda.is_available() is False); run it on a machine with "
              "an NVIDIA GPU and a CUDA build of torch. Nothing was measured.", file=sys.stderr)
        return 2
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="tessera-gpu-bench-"))
    try:
        checkpoint = build_checkpoint(args.model, workdir / "checkpoint")
        manifest = write_corpus(workdir / "corpus", args.items, args.image_size)
        result = {
            "benchmark": "gpu_bench", "model": args.model, "gpu": torch.cuda.get_device_name(0),
            "items": args.items, "max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size,
            "image_size": list(args.image_size), "backends": {},
        }
        for backend in args.backends:
            if backend == "loop":
                result["backends"]["loop"] = run_loop(checkpoint, manifest, args.max_new_tokens)
            elif backend == "vllm" and not _importable("vllm"):
                result["backends"]["vllm"] = {"skipped": "vLLM is not importable in this environment"}
            else:
                result["backends"][backend] = run_pipeline(backend, checkpoint, manifest, workdir, args)
        loop = result["backends"].get("loop", {}).get("items_per_s")
        for name, numbers in result["backends"].items():
            if loop and numbers.get("items_per_s") and name != "loop":
                numbers["speedup_vs_loop"] = round(numbers["items_per_s"] / loop, 2)
        text = json.dumps(result, indent=2)
        print(text)
        if args.out:
            Path(args.out).write_text(text + "\n")
        return 0
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


if __name__ == "__main__":
    sys.exit(main())
