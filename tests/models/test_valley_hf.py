"""Valley2.5 HF model (mllm_mega/models/families/valley/hf) against an independent reference.

The reference is assembled here from transformers' own ``Qwen2VisionTransformerPretrainedModel`` and
``Qwen3Model`` loaded with the same weights: vision features scattered onto the placeholder rows by hand,
3-row positions from a brute-force walk over the tokens, MRoPE cos/sin from the formula (frequency j takes
row 0, 1 or 2 by ``mrope_section``), an additive causal + padding mask, and the decoder layers called one by
one. Nothing of the code under test is used by the reference.
"""
from __future__ import annotations

import pytest
import torch

from mllm_mega.models.families.valley.tiny import build_tiny_valley

PATCH = 3 * 2 * 14 * 14  # channels * temporal patch * patch * patch


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny shapes: one intra-op thread is as fast and does not fight the other jobs of a loaded 2-core CI
    machine (measured there: the generate test 88 s with 2 threads, 1.8 s with 1)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def models():
    return {mode: build_tiny_valley(seed=3, position_mode=mode) for mode in ("mrope", "1d")}


def _vision_block(config, token_id, grid):
    t, h, w = grid
    return [config.vision_start_token_id] + [token_id] * (t * h * w // 4) + [config.vision_end_token_id]


def make_case(config, case: str, seed: int = 0) -> dict:
    """input_ids (+ attention_mask), pixel_values / pixel_values_videos and their grids for one test case."""
    g = torch.Generator().manual_seed(seed)
    text = lambda n: torch.randint(10, 300, (n,), generator=g).tolist()  # noqa: E731
    img, vid = config.image_token_id, config.video_token_id
    if case == "image":
        seqs, images, videos = [[*text(3), *_vision_block(config, img, (1, 4, 6)), *text(4)]], [(1, 4, 6)], []
    elif case == "video":
        seqs, images, videos = [[*text(2), *_vision_block(config, vid, (2, 4, 4)), *text(5)]], [], [(2, 4, 4)]
    elif case == "images":
        seqs = [[*text(2), *_vision_block(config, img, (1, 4, 4)), *text(3), *_vision_block(config, img, (1, 2, 6)),
                 *text(2)]]
        images, videos = [(1, 4, 4), (1, 2, 6)], []
    elif case == "batch2":  # second sample shorter: left-padded, with an attention mask
        a = [*text(2), *_vision_block(config, img, (1, 4, 6)), *text(3)]
        b = [*text(1), *_vision_block(config, img, (1, 2, 4)), *text(2)]
        seqs, images, videos = [a, [0] * (len(a) - len(b)) + b], [(1, 4, 6), (1, 2, 4)], []
    else:
        raise ValueError(case)
    out = {"input_ids": torch.tensor(seqs)}
    if case == "batch2":
        mask = torch.ones_like(out["input_ids"])
        mask[1, : len(a) - len(b)] = 0
        out["attention_mask"] = mask
    for key, grids in (("image", images), ("video", videos)):
        if grids:
            n = sum(t * h * w for t, h, w in grids)
            out["pixel_values" if key == "image" else "pixel_values_videos"] = torch.randn(n, PATCH, generator=g)
            out[f"{key}_grid_thw"] = torch.tensor(grids)
    return out


def brute_force_positions(config, ids, mask, grids, mode):
    """(3, T) positions of one sample by walking its tokens (padding gets 0)."""
    keep = [i for i in range(len(ids)) if mask is None or mask[i]]
    pos = torch.zeros(3, len(ids), dtype=torch.long)
    cur, i, grids = 0, 0, list(grids)
    while i < len(keep):
        tok = ids[keep[i]]
        if mode == "mrope" and tok in (config.image_token_id, config.video_token_id):
            t, h, w = grids.pop(0)
            h, w = h // 2, w // 2
            for ti in range(t):
                for hi in range(h):
                    for wi in range(w):
                        pos[:, keep[i]] = torch.tensor([cur + ti, cur + hi, cur + wi])
                        i += 1
            cur += max(h, w)  # transformers' rule: text resumes max(h, w) after the block start
        else:
            pos[:, keep[i]] = cur
            cur, i = cur + 1, i + 1
    return pos


def reference_logits(model, inputs, mode):
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel
    from transformers.models.qwen3.modeling_qwen3 import Qwen3Model

    config = model.config
    state = model.state_dict()
    visual = Qwen2VisionTransformerPretrainedModel._from_config(config.vision_config, attn_implementation="eager")
    visual.load_state_dict({k[len("visual."):]: v for k, v in state.items() if k.startswith("visual.")})
    llm = Qwen3Model._from_config(config.text_config, attn_implementation="eager")
    llm.load_state_dict({k[len("model."):]: v for k, v in state.items() if k.startswith("model.")})
    lm_head = state["lm_head.weight"]
    visual.eval(), llm.eval()

    ids = inputs["input_ids"]
    mask = inputs.get("attention_mask")
    x = llm.embed_tokens(ids)
    grids_in_order = []  # per sample, the grids of its vision blocks in order
    for kind, token in (("image", config.image_token_id), ("video", config.video_token_id)):
        key = "pixel_values" if kind == "image" else "pixel_values_videos"
        if key not in inputs:
            continue
        feats = visual(inputs[key], grid_thw=inputs[f"{kind}_grid_thw"]).pooler_output
        rows = (ids == token).nonzero().tolist()  # row-major: sample by sample, left to right
        assert len(rows) == feats.shape[0]
        for (b, t), f in zip(rows, feats):
            x[b, t] = f
    grids = inputs.get("image_grid_thw", inputs.get("video_grid_thw")).tolist()
    per_sample, k = [], 0
    for b in range(ids.shape[0]):
        n_blocks = int(((ids[b] == config.vision_start_token_id)).sum())
        per_sample.append(grids[k:k + n_blocks])
        k += n_blocks
    pos = torch.stack([brute_force_positions(config, ids[b].tolist(), None if mask is None else mask[b].tolist(),
                                             per_sample[b], mode) for b in range(ids.shape[0])], dim=1)
    text = config.text_config
    d = text.head_dim
    inv_freq = 1.0 / (text.rope_parameters["rope_theta"] ** (torch.arange(0, d, 2, dtype=torch.float) / d))
    s0, s1, _ = config.mrope_section
    row = torch.tensor([0 if j < s0 else 1 if j < s0 + s1 else 2 for j in range(d // 2)])
    angle = pos[row].permute(1, 2, 0).float() * inv_freq  # (B, T, d/2): frequency j from position row[j]
    emb = torch.cat([angle, angle], dim=-1)
    cos, sin = emb.cos(), emb.sin()
    T = ids.shape[1]
    allowed = torch.tril(torch.ones(T, T, dtype=torch.bool))[None] & (
        torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool())[:, None, :]
    additive = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)[:, None]
    h = x
    for layer in llm.layers:
        h = layer(h, attention_mask=additive, position_embeddings=(cos, sin))
    return llm.norm(h) @ lm_head.T


# fp32 on tiny shapes: both paths do the same operations in the same order (the RoPE tables are computed by
# hand here with the same formula); measured max |diff| 0.0 on every case (CPU, eager). 1e-6 leaves room for
# another BLAS, far below the 2e-3 of a swapped MRoPE section.
ATOL = 1e-6


@pytest.mark.parametrize("case", ["image", "video", "images", "batch2"])
def test_mrope_logits_match_reference(models, case):
    model = models["mrope"]
    inputs = make_case(model.config, case, seed=len(case))
    with torch.no_grad():
        got = model(**inputs).logits
        want = reference_logits(model, inputs, "mrope")
    keep = inputs.get("attention_mask", torch.ones_like(inputs["input_ids"])).bool()
    diff = (got - want)[keep].abs().max().item()
    assert diff <= ATOL, f"{case}: max |diff| {diff}"


def test_1d_logits_match_reference(models):
    model = models["1d"]
    inputs = make_case(model.config, "batch2", seed=5)
    with torch.no_grad():
        got = model(**inputs).logits
        want = reference_logits(model, inputs, "1d")
        other = reference_logits(model, inputs, "mrope")
    keep = inputs["attention_mask"].bool()
    assert (got - want)[keep].abs().max().item() <= ATOL
    assert (got - other)[keep].abs().max().item() > 1e-3  # the two modes really differ on images


def test_generate_equals_greedy_loop(models):
    """generate() (KV cache, pixels only on the prefill, positions grown by one) = argmax over full forwards."""
    for mode, model in models.items():
        inputs = make_case(model.config, "batch2", seed=7)
        model.generation_config.eos_token_id = None  # the loop below never stops early either
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=6, do_sample=False, pad_token_id=0)
            ids, mask = inputs["input_ids"], inputs["attention_mask"]
            extra = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
            for _ in range(6):
                nxt = model(input_ids=ids, attention_mask=mask, **extra).logits[:, -1].argmax(-1, keepdim=True)
                ids, mask = torch.cat([ids, nxt], 1), torch.cat([mask, torch.ones_like(nxt)], 1)
        assert torch.equal(out, ids), (mode, out, ids)


def test_placeholder_count_mismatch_is_an_error(models):
    model = models["mrope"]
    inputs = make_case(model.config, "image")
    inputs["input_ids"][0, 4] = 7  # one image placeholder (ids 4..9 after 3 text tokens + vision_start) fewer
    with pytest.raises(ValueError, match="placeholder tokens"):
        model(**inputs)
