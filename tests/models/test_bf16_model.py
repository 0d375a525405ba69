"""bf16 models: every parameter bf16, norms as transformers' in bf16, megatron's mixed-precision optimizer.

References are independent: transformers' ``Qwen2RMSNorm`` (Qwen2.5-VL's LLM and ViT norm) and ``nn.LayerNorm``
over fp32 statistics computed here (Qwen2-VL's ViT norm), and the optimizer state checked against what
megatron's mixed-precision recipe means (fp32 main grads, fp32 master weights, bf16 model weights = master
weights rounded).
"""
import pytest
import torch

from mllm_mega.models.common.norm import TorchLayerNorm, TorchRMSNorm, TritonRMSNorm
from mllm_mega.models.qwen2_vl.configuration import arch_from_hf_config
from mllm_mega.models.qwen2_vl.family import build_model
from mllm_mega.models.qwen2_vl.tiny import tiny_hf_config_dict
from mllm_mega.parallel.initialize import initialize_distributed


class _Cfg:  # the two config attributes the norms read
    params_dtype = torch.bfloat16
    sequence_parallel = False


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen2_vl"])
def test_every_parameter_of_a_bf16_model_is_bf16(family):
    initialize_distributed(1, 1)
    model = build_model(arch_from_hf_config(tiny_hf_config_dict(family)), params_dtype=torch.bfloat16)
    not_bf16 = [(n, p.dtype) for n, p in model.named_parameters() if p.dtype != torch.bfloat16]
    assert not not_bf16, not_bf16
    # deliberate fp32 exceptions: only the RoPE inverse frequencies, which are buffers, not parameters
    assert {n: b.dtype for n, b in model.named_buffers()} == {"rope_inv_freq": torch.float32,
                                                              "vision.rope_inv_freq": torch.float32}
    fp32 = build_model(arch_from_hf_config(tiny_hf_config_dict(family)))
    assert {p.dtype for p in fp32.parameters()} == {torch.float32}


def _inputs(hidden, seed=0):
    g = torch.Generator().manual_seed(seed)
    # rows with a large common offset: a bf16 mean of squares would be visibly wrong (fp32 statistics matter)
    x = (torch.randn(33, hidden, generator=g) * 3 + 40).to(torch.bfloat16)
    w = (1 + 0.1 * torch.randn(hidden, generator=g)).to(torch.bfloat16)
    return x, w


@pytest.mark.parametrize("cls", [TorchRMSNorm, TritonRMSNorm], ids=["torch", "triton"])
def test_rmsnorm_bf16_matches_transformers(cls):
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

    hidden = 80
    x, w = _inputs(hidden)
    ours = cls(_Cfg(), hidden_size=hidden, eps=1e-6)
    hf = Qwen2RMSNorm(hidden, eps=1e-6).to(torch.bfloat16)
    assert ours.weight.dtype == torch.bfloat16
    with torch.no_grad():
        ours.weight.copy_(w)
        hf.weight.copy_(w)
    y, ref = ours(x), hf(x)
    assert y.dtype == ref.dtype == torch.bfloat16
    # torch: the same ops as HF, bit-identical. Triton under the CPU interpreter: its bf16 casts (x_hat, then
    # the output) truncate instead of rounding, so each can lose up to 1 ulp (measured: max 1.5 ulp, all low);
    # 2 ulps = 2 * 2^-7 relative (on a GPU the kernel rounds; not yet measured on GPU)
    if cls is TorchRMSNorm:
        assert torch.equal(y, ref)
    else:
        assert ((y.float() - ref.float()).abs() <= ref.float().abs() * 2 ** -6).all()
    # statistics in bf16 instead (the bug class this guards) differ from HF by far more than that
    xb = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    assert not torch.equal(w * xb, ref)


def test_layernorm_bf16_uses_fp32_statistics():
    hidden = 48
    x, w = _inputs(hidden, seed=1)
    b = (0.1 * torch.randn(hidden, generator=torch.Generator().manual_seed(2))).to(torch.bfloat16)
    norm = TorchLayerNorm(_Cfg(), hidden_size=hidden, eps=1e-6)
    assert norm.weight.dtype == norm.bias.dtype == torch.bfloat16
    with torch.no_grad():
        norm.weight.copy_(w)
        norm.bias.copy_(b)
    y = norm(x)
    xf = x.float()
    ref = (xf - xf.mean(-1, keepdim=True)) * torch.rsqrt(xf.var(-1, unbiased=False, keepdim=True) + 1e-6)
    ref = (ref * w.float() + b.float()).to(torch.bfloat16)
    assert y.dtype == torch.bfloat16
    # fp32 statistics, one rounding at the end (measured: identical except 1-ulp ties)
    assert ((y.float() - ref.float()).abs() <= ref.float().abs() * 2 ** -7 + 1e-6).all()


def test_mixed_precision_optimizer_keeps_fp32_grads_and_master_weights(tmp_path):
    """One real training step of a bf16 model through our DDP + optimizer setup (TP1, one rank)."""
    from mllm_mega.config import load_config
    from mllm_mega.models.qwen2_vl.inputs import random_inputs
    from mllm_mega.models.vlm import pack_hf_batch
    from mllm_mega.training import setup
    from mllm_mega.training.step import train_step

    initialize_distributed(1, 1)
    arch = arch_from_hf_config(tiny_hf_config_dict("qwen2_5_vl"))
    cfg = load_config(None, [f"run_dir={tmp_path}", "model.dtype=bfloat16", "optimizer.lr=1e-2"])
    model = build_model(arch, params_dtype=torch.bfloat16)
    ddp = setup.wrap_ddp(model, cfg)
    optimizer, _ = setup.build_optimizer(ddp, cfg, torch.bfloat16)
    assert {b.grad_data.dtype for b in ddp.buffers} == {torch.float32}  # fp32 main grads
    assert {b.param_data.dtype for b in ddp.buffers} == {torch.bfloat16}
    inputs = random_inputs(arch, "image", seed=0)
    ids, pos, cu, _ = pack_hf_batch(arch, inputs["input_ids"], inputs["attention_mask"],
                                    image_grid_thw=inputs["image_grid_thw"])
    labels = torch.roll(ids, -1)
    mb = {"input_ids": ids, "position_ids": pos, "cu_seqlens": cu, "max_seqlen": int(cu[-1]),
          "labels": labels, "loss_weights": torch.ones(ids.shape), "pixel_values": inputs["pixel_values"],
          "image_grid_thw": inputs["image_grid_thw"]}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    from megatron.core import parallel_state as ps

    result = train_step(ddp, optimizer, [mb], kernels="torch", dp_group=ps.get_data_parallel_group())
    assert not result["skipped"] and result["grad_norm"] > 0
    subs = getattr(optimizer, "chained_optimizers", [optimizer])
    mains = [p for sub in subs for group in sub.shard_fp32_from_float16_groups for p in group]
    assert mains and {p.dtype for p in mains} == {torch.float32}  # fp32 master weights
    masters = {id(m): m for m in mains}
    assert len(masters) == len(list(model.parameters()))
    model_params = [p for sub in subs for group in sub.model_float16_groups for p in group]
    changed = 0
    for p, master in zip(model_params, mains):
        assert p.dtype == torch.bfloat16
        # the bf16 weight is its fp32 master rounded (for a distributed-optimizer shard of the whole param)
        assert torch.equal(master.to(torch.bfloat16).view(-1), p.detach().view(-1)[:master.numel()])
        changed += int(not torch.equal(master.to(torch.bfloat16), master))  # master holds finer values
    assert changed > 0
    # the step moved the bf16 weights (a few tensors' updates stay under half a bf16 ulp: only the master moves)
    assert sum(not torch.equal(before[n], p) for n, p in model.named_parameters()) > len(before) // 2
