"""benchmarks/gpu_bench.py's CPU-safe parts: arguments, the real-shape configs (checked on
the meta device: no memory, no download), and the clear exit where CUDA is absent."""

from __future__ import annotations

import pytest

from benchmarks import gpu_bench


def test_arguments():
    args = gpu_bench.parse_args(["--items", "8", "--backends", "loop,transformers", "--image-size", "320x240"])
    assert args.items == 8 and args.backends == ["loop", "transformers"] and args.image_size == (320, 240)
    with pytest.raises(SystemExit):
        gpu_bench.parse_args(["--backends", "tgi"])


@pytest.mark.parametrize("name, billions", [("qwen2-vl-2b", (2.1, 2.3)), ("smolvlm-2b", (2.0, 2.5))])
def test_real_shape_on_meta(name, billions):
    from actors.sharding import meta_model, ties_embeddings

    model = meta_model(gpu_bench.real_shape_config(name, gpu_bench.token_ids(name)))
    params = sum(p.numel() for p in model.parameters())
    if ties_embeddings(model):  # on the meta device the tie is only in the config
        params -= model.get_output_embeddings().weight.numel()
    params /= 1e9
    low, high = billions
    assert low < params < high, params


def test_exits_clearly_without_cuda(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert gpu_bench.main(["--items", "1"]) == 2
    assert "no CUDA device" in capsys.readouterr().err
