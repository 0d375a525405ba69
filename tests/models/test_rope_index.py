"""Our MRoPE position ids against transformers' get_rope_index (the independent reference)."""
import pytest
import torch

from mllm_mega.models.qwen2_vl.configuration import arch_from_hf_config
from mllm_mega.models.qwen2_vl.inputs import CASES, random_inputs
from mllm_mega.models.positions import get_rope_index
from mllm_mega.models.qwen2_vl.tiny import build_tiny_hf_model, tiny_hf_config_dict


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen2_vl"])
@pytest.mark.parametrize("case", [c for c in CASES if c != "text"])
def test_rope_index_matches_hf(family, case):
    hf = build_tiny_hf_model(family)
    arch = arch_from_hf_config(tiny_hf_config_dict(family))
    inp = random_inputs(arch, case)
    kwargs = {k: inp.get(k) for k in ("image_grid_thw", "video_grid_thw", "attention_mask")}
    if family == "qwen2_5_vl":
        kwargs["second_per_grid_ts"] = inp.get("second_per_grid_ts")
    ref, _ = hf.model.get_rope_index(inp["input_ids"], mm_token_type_ids=inp["mm_token_type_ids"], **kwargs)
    ours = get_rope_index(
        inp["input_ids"], image_token_id=arch.image_token_id, video_token_id=arch.video_token_id,
        spatial_merge_size=2, tokens_per_second=arch.vision.tokens_per_second if family == "qwen2_5_vl" else None,
        **{k: v for k, v in kwargs.items()},
    )
    mask = inp["attention_mask"].bool()
    assert torch.equal(ours[:, mask], ref[:, mask])
    if case == "video" and family == "qwen2_5_vl":
        # the temporal row really is scaled by tokens_per_second * second_per_grid_t (2 * 1.5 = 3)
        t_rows = ours[0, 0][inp["input_ids"][0] == arch.video_token_id].unique()
        assert (t_rows[1:] - t_rows[:-1]).tolist() == [3, 3]
