"""The model with ``kernels: triton`` (Triton interpreter on CPU) gives the logits of ``kernels: torch``."""
import pytest
import torch

from mllm_mega.models.qwen2_vl.configuration import arch_from_hf_config
from mllm_mega.models.qwen2_vl.inputs import random_inputs
from mllm_mega.models.qwen2_vl.family import build_model
from mllm_mega.models.vlm import pack_hf_batch
from mllm_mega.models.common.layer_spec import resolve_kernels
from mllm_mega.models.qwen2_vl.tiny import tiny_hf_config_dict
from mllm_mega.parallel.initialize import initialize_distributed


def test_auto_is_torch_without_cuda():
    assert resolve_kernels("auto") == ("triton" if torch.cuda.is_available() else "torch")
    with pytest.raises(ValueError, match="kernels="):
        resolve_kernels("cuda")


@pytest.mark.parametrize("case", ["multi_image", "batch"])
def test_triton_kernels_match_torch(case):
    initialize_distributed(1, 1)
    arch = arch_from_hf_config(tiny_hf_config_dict("qwen2_5_vl"))
    ref = build_model(arch, kernels="torch").eval()
    tri = build_model(arch, kernels="triton").eval()
    tri.load_state_dict(ref.state_dict())
    inp = random_inputs(arch, case)
    ids, pos, cu, _ = pack_hf_batch(arch, inp["input_ids"], inp["attention_mask"], inp["image_grid_thw"])
    kw = dict(pixel_values=inp["pixel_values"], image_grid_thw=inp["image_grid_thw"])
    with torch.no_grad():
        a = ref(ids, pos, cu, **kw)
        b = tri(ids, pos, cu, **kw)
    # fp32 both ways; online softmax vs SDPA differ only by rounding.
    assert (a - b).abs().max().item() < 1e-5
