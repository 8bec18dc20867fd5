"""The vLLM backend (`model.backend: vllm`, the optional `vllm` extra): one offline `vllm.LLM`
engine per replica, tensor-parallel over the replica's k GPUs.

Placement follows Ray Data LLM (`ray/llm/_internal/batch/stages/vllm_engine_stage.py`):
- k > 1: the actor holds no GPU itself; pipeline/graph.py gives each replica a STRICT_PACK
  placement group of k GPU bundles and schedules the actor into it with
  `placement_group_capture_child_tasks=True`; vLLM's Ray executor
  (`distributed_executor_backend="ray"`) finds that group and puts one tensor-parallel
  worker in each bundle, so a replica never straddles nodes;
- k <= 1: the actor holds its GPU (or a share of one; vLLM then takes that share of the
  GPU's memory) and vLLM runs in-process (`"uni"`).

Inputs: the CPU stage sends the chat-templated prompt and the decoded, downscaled uint8
images (ModelInputs.text / .images); vLLM's own processor tiles them. Structured output:
`SamplingParams(structured_outputs=StructuredOutputsParams(json=schema))` (the API since vLLM
0.10.2; this targets 0.33), without free whitespace as in actors/constrained.py.

Imported only when a spec asks for it, so the project installs and tests without vLLM.
"""

from __future__ import annotations

from actors.backends import Generation
from actors.inputs import ModelInputs
from actors.loading import ResolvedModel
from schemas.spec import ModelSpec, SamplingSpec

# vLLM quantises in flight to 4 bits with bitsandbytes; int8 checkpoints must come
# pre-quantised (vLLM reads their quantisation from config.json) or use engine_kwargs.
_QUANTIZATION = {"int4": "bitsandbytes"}


def engine_arguments(resolved: ResolvedModel, spec: ModelSpec, model_path: str) -> dict:
    """vLLM engine arguments for one replica (pure: tested without vLLM)."""
    gpus = spec.gpus_per_replica if spec.gpus_per_replica is not None else 1.0
    tensor_parallel = max(1, int(gpus))
    args: dict = {
        "model": model_path,
        "tokenizer": model_path,
        "trust_remote_code": resolved.trust_remote_code,
        "tensor_parallel_size": tensor_parallel,
        "distributed_executor_backend": "ray" if tensor_parallel > 1 else "uni",
        "dtype": spec.dtype,
        "seed": 0,
        "enable_prefix_caching": True,  # every row of a job shares its prompt's prefix
    }
    if 0 < gpus < 1:
        args["gpu_memory_utilization"] = round(0.9 * gpus, 3)
    if spec.quantization:
        if spec.quantization not in _QUANTIZATION:
            raise ValueError(
                f"model.quantization: {spec.quantization} is not an in-flight vLLM quantisation; use a "
                "pre-quantised checkpoint (vLLM reads it from config.json) or model.engine_kwargs.quantization"
            )
        args["quantization"] = _QUANTIZATION[spec.quantization]
    args.update(spec.engine_kwargs)
    return args


def sampling_arguments(sampling: SamplingSpec, max_new_tokens: int, schema: dict | None) -> dict:
    args: dict = {"max_tokens": max_new_tokens, "skip_special_tokens": True}
    if sampling.temperature > 0:
        args.update(temperature=sampling.temperature, top_p=sampling.top_p, seed=sampling.seed)
    else:
        args.update(temperature=0.0)
    return args


def engine_prompt(item: ModelInputs) -> dict:
    """One vLLM prompt: text plus images (vLLM's processor tiles them)."""
    if item.text is None:
        raise ValueError("the vLLM backend needs prompt text from the CPU stage (model.backend was not vllm there)")
    prompt: dict = {"prompt": item.text}
    if item.images:
        from PIL import Image

        prompt["multi_modal_data"] = {"image": [Image.fromarray(image) for image in item.images]}
    return prompt


class VllmBackend:
    # vLLM schedules and batches by itself: give it the whole block at once.
    schedules_itself = True

    def __init__(self, resolved: ResolvedModel, spec: ModelSpec):
        try:
            import vllm
        except ImportError:
            raise ImportError(
                "model.backend: vllm needs vLLM in the workers' environment: pip install 'tessera[vllm]' "
                "(on a CUDA image; see docs/scaling.md)"
            ) from None
        self._vllm = vllm
        self.llm = vllm.LLM(**engine_arguments(resolved, spec, resolved.local_path()))

    def generate(self, items: list[ModelInputs], sampling: SamplingSpec, max_new_tokens: int, schema: dict | None):
        from vllm.sampling_params import StructuredOutputsParams

        args = sampling_arguments(sampling, max_new_tokens, schema)
        if schema is not None:
            args["structured_outputs"] = StructuredOutputsParams(json=schema, disable_any_whitespace=True)
        params = self._vllm.SamplingParams(**args)
        outputs = self.llm.generate([engine_prompt(item) for item in items], params, use_tqdm=False)
        return [_generation(output.outputs[0]) for output in outputs]


def _generation(completion) -> Generation:
    finished = completion.finish_reason == "stop"
    return Generation(text=completion.text, output_tokens=len(completion.token_ids), finished=finished)
