"""Fused RoPE/MRoPE/2-D RoPE: the reference against HF transformers' Qwen2.5-VL functions and a complex-
number rotation; the Triton kernel (interpreter on CPU) against the reference, forward and backward."""
import pytest
import torch
from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as hf
from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLTextConfig, Qwen2_5_VLVisionConfig
from transformers.vision_utils import get_vision_position_ids

from mllm_mega.kernels import apply_rope, apply_rope_ref


def _llm_inv_freq(head_dim, theta=1e6):
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))


def _vit_inv_freq(head_dim, theta=10000.0):
    f = 1.0 / (theta ** (torch.arange(0, head_dim // 2, 2, dtype=torch.float32) / (head_dim // 2)))
    return torch.cat([f, f])


# ---- the reference against independent computations ---------------------------------------------------
def test_ref_matches_hf_mrope():
    head_dim, heads, tokens = 128, 3, 37
    config = Qwen2_5_VLTextConfig(hidden_size=heads * head_dim, num_attention_heads=heads, head_dim=head_dim,
                                  rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                                   "mrope_section": [16, 24, 24]})
    rotary = hf.Qwen2_5_VLRotaryEmbedding(config)
    pos = torch.randint(0, 5000, (3, tokens))
    q, k = torch.randn(tokens, heads, head_dim), torch.randn(tokens, 1, head_dim)
    cos, sin = rotary(q, pos[:, None, :])  # (1, tokens, head_dim), fp32 because x is fp32
    q_hf, k_hf = hf.apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos, sin)
    inv_freq = _llm_inv_freq(head_dim)
    torch.testing.assert_close(inv_freq, rotary.inv_freq, atol=0, rtol=0)
    # same fp32 angles and products on both sides, only the order of two fp32 terms differs
    torch.testing.assert_close(apply_rope_ref(q, pos, inv_freq, (16, 24, 24)), q_hf[0].transpose(0, 1),
                               atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(apply_rope_ref(k, pos, inv_freq, (16, 24, 24)), k_hf[0].transpose(0, 1),
                               atol=1e-5, rtol=1e-5)


def test_ref_matches_hf_vision_2d_rope():
    head_dim, heads = 80, 2
    config = Qwen2_5_VLVisionConfig(hidden_size=heads * head_dim, num_heads=heads)
    rotary = hf.Qwen2_5_VLVisionRotaryEmbedding(config)
    grid_thw = torch.tensor([[1, 4, 6], [2, 2, 2]])
    pos_hw = get_vision_position_ids(grid_thw, 2)  # (tokens, 2): (h, w) in HF's merge-block order
    tokens = pos_hw.shape[0]
    q, k = torch.randn(tokens, heads, head_dim), torch.randn(tokens, heads, head_dim)
    cos, sin = rotary(q, pos_hw)
    q_hf, k_hf = hf.apply_rotary_pos_emb_vision(q, k, cos, sin)
    inv_freq = _vit_inv_freq(head_dim)
    sections = (head_dim // 4, head_dim // 4)
    torch.testing.assert_close(apply_rope_ref(q, pos_hw.t(), inv_freq, sections), q_hf, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(apply_rope_ref(k, pos_hw.t(), inv_freq, sections), k_hf, atol=1e-5, rtol=1e-5)


def test_ref_1d_matches_complex_rotation():
    tokens, heads, head_dim = 11, 2, 64
    x = torch.randn(tokens, heads, head_dim, dtype=torch.float64)
    pos = torch.randint(0, 1000, (1, tokens))
    inv_freq = _llm_inv_freq(head_dim, 10000.0)
    half = head_dim // 2
    angle = pos[0].double()[:, None] * inv_freq.double()[None, :]  # float64 angles
    z = torch.complex(x[..., :half], x[..., half:]) * torch.polar(torch.ones_like(angle), angle)[:, None, :]
    expected = torch.cat([z.real, z.imag], dim=-1)
    # the reference rounds the angle to fp32 (like HF): |theta| <= 1000 gives errors <= ~6e-5 rad
    torch.testing.assert_close(apply_rope_ref(x.float(), pos, inv_freq, (half,)).double(), expected,
                               atol=3e-4, rtol=0)


# ---- the kernel against the reference ---------------------------------------------------------------
CASES = {  # name: (tokens, heads, head_dim, sections, inv_freq builder, max position)
    "mrope_hd128": (37, 3, 128, (16, 24, 24), _llm_inv_freq, 40000),
    "vit_hd80": (17, 5, 80, (20, 20), _vit_inv_freq, 64),
    "rope1d_hd64_far": (9, 2, 64, (32,), _llm_inv_freq, 200000),  # angles up to 2e5 rad
    "single_token": (1, 1, 64, (8, 12, 12), _llm_inv_freq, 10),
}
# Tolerances: fp32: both round the same fp32 angle; cos/sin of it differ by a few ulp (the kernel range-
# reduces first) -> 2e-6 on O(1) values. 16-bit outputs: one rounding of nearly equal fp32 values may
# land on neighbouring 16-bit numbers: one ulp relative (2^-8 bf16, 2^-11 fp16) plus a tiny absolute term.
TOL = {torch.float32: dict(atol=2e-6, rtol=2e-6), torch.bfloat16: dict(atol=1e-3, rtol=2 ** -7),
       torch.float16: dict(atol=1e-4, rtol=2 ** -10)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", list(CASES))
def test_kernel_matches_ref(case, dtype):
    tokens, heads, head_dim, sections, inv_freq_fn, max_pos = CASES[case]
    x = torch.randn(tokens, heads, head_dim).to(dtype).requires_grad_()
    pos = torch.randint(0, max_pos, (len(sections), tokens))
    inv_freq = inv_freq_fn(head_dim)
    dy = torch.randn(tokens, heads, head_dim).to(dtype)
    y = apply_rope(x, pos, inv_freq, sections)
    (dx,) = torch.autograd.grad(y, x, dy)
    y_ref = apply_rope_ref(x, pos, inv_freq, sections)
    (dx_ref,) = torch.autograd.grad(y_ref, x, dy)
    assert y.dtype == dtype and dx.dtype == dtype
    torch.testing.assert_close(y, y_ref, **TOL[dtype])
    torch.testing.assert_close(dx, dx_ref, **TOL[dtype])


def test_kernel_strided_input_and_positions():
    # x as a view of a fused qkv buffer (token stride != heads * head_dim), positions expanded from (1, T)
    qkv = torch.randn(13, 6, 64)
    x = qkv[:, 1:4]
    pos = torch.arange(13)[None].expand(3, 13)
    y = apply_rope(x, pos, _llm_inv_freq(64), (8, 12, 12))
    torch.testing.assert_close(y, apply_rope_ref(x, pos, _llm_inv_freq(64), (8, 12, 12)), **TOL[torch.float32])


def test_backward_is_inverse_rotation():
    x = torch.randn(7, 2, 64)
    pos = torch.randint(0, 100, (1, 7))
    inv_freq = _llm_inv_freq(64)
    y = apply_rope(x, pos, inv_freq, (32,))
    # the rotation is orthogonal, so the backward applied to y (rotation by -theta) gives back x
    x_req = x.clone().requires_grad_()
    (x_back,) = torch.autograd.grad(apply_rope(x_req, pos, inv_freq, (32,)), x_req, y)
    torch.testing.assert_close(x_back, x, atol=1e-5, rtol=1e-5)


def test_input_errors():
    x = torch.randn(4, 2, 64)
    with pytest.raises(ValueError, match="sections"):
        apply_rope(x, torch.zeros(3, 4, dtype=torch.long), _llm_inv_freq(64), (10, 10, 10))
    with pytest.raises(ValueError, match="position_ids"):
        apply_rope(x, torch.zeros(2, 4, dtype=torch.long), _llm_inv_freq(64), (8, 12, 12))
    with pytest.raises(ValueError, match="inv_freq"):
        apply_rope(x, torch.zeros(1, 4, dtype=torch.long), _llm_inv_freq(64).double(), (32,))
    with pytest.raises(ValueError, match="position_ids"):
        apply_rope(x, torch.zeros(1, 4), _llm_inv_freq(64), (32,))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_llm_and_vit_shapes(dtype):
    for tokens, heads, head_dim, sections, inv_freq_fn in [(8192, 28, 128, (16, 24, 24), _llm_inv_freq),
                                                           (16384, 16, 80, (20, 20), _vit_inv_freq)]:
        x = torch.randn(tokens, heads, head_dim, device="cuda", dtype=dtype, requires_grad=True)
        pos = torch.randint(0, 32768, (len(sections), tokens), device="cuda")
        inv_freq = inv_freq_fn(head_dim).cuda()
        dy = torch.randn_like(x)
        y = apply_rope(x, pos, inv_freq, sections)
        (dx,) = torch.autograd.grad(y, x, dy)
        y_ref = apply_rope_ref(x, pos, inv_freq, sections)
        (dx_ref,) = torch.autograd.grad(y_ref, x, dy)
        # GPU cos/sin after the kernel's range reduction stay within a few fp32 ulp of torch's
        tol = TOL[dtype] if dtype != torch.float32 else dict(atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(y, y_ref, **tol)
        torch.testing.assert_close(dx, dx_ref, **tol)
