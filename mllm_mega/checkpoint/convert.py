"""HF import and logits verification for every registered family (the logic behind
``tools/convert_checkpoint.py``): the family comes from the HF config, its key map, stage builder and verify
inputs from its :class:`~mllm_mega.models.registry.FamilySpec`."""
from __future__ import annotations

import os
import shutil

import torch
import torch.distributed as dist
from tqdm import tqdm

from mllm_mega.checkpoint.hf_io import HFCheckpointReader
from mllm_mega.models import registry
from mllm_mega.models.layout import ParallelLayout
from mllm_mega.parallel.initialize import initialize_distributed
from mllm_mega.parallel.schedule import forward_only
from mllm_mega.training import checkpointing as ckpt


def import_hf(hf_dir: str, out: str, *, progress: bool = True) -> None:
    """HF directory -> megatron dist checkpoint at ``out`` (iteration 0, model only, fp32).

    Everything is validated before anything is written; the checkpoint is built under a temporary name next
    to ``out`` and renamed when complete, so a failure leaves nothing at ``out``.
    """
    if os.path.exists(out) and os.listdir(out):
        raise FileExistsError(f"--out {out!r} exists and is not empty")
    reader = HFCheckpointReader(hf_dir)
    reader.check_keys()
    arch = reader.arch
    src_dtype = reader.dtype()
    initialize_distributed(1, 1)
    spec = registry.spec_of(arch)
    model = spec.build_stage(arch, ParallelLayout(), kernels="torch")
    expected = {k: v.shape for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    state = {}
    pairs = spec.key_map(arch)
    it = spec.hf_to_ours(arch, reader.get, expected)
    for ours, tensor in tqdm(it, total=len(pairs), desc="import-hf", disable=not progress, unit="tensor"):
        state[ours] = tensor.to(torch.float32)
    missing = sorted(set(expected) - set(state))
    if missing:
        raise ValueError(f"model parameters with no HF source: {missing}")
    model.load_state_dict(state, strict=True)
    reader.close()
    from mllm_mega.checkpoint.io import staged_output

    with staged_output(out, ".import-") as tmp:
        ckpt.write_meta(tmp, {"hf_config": arch.hf_config, "source_dtype": str(src_dtype).replace("torch.", ""),
                              "source": os.path.abspath(hf_dir)})
        ckpt.save_checkpoint(tmp, 0, ckpt.model_sharded_state_dict(model))
        for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
                     "preprocessor_config.json", "chat_template.json", "chat_template.jinja", "generation_config.json",
                     "special_tokens_map.json"):
            if os.path.isfile(os.path.join(hf_dir, name)):
                os.makedirs(os.path.join(tmp, "hf_extra"), exist_ok=True)
                shutil.copy2(os.path.join(hf_dir, name), os.path.join(tmp, "hf_extra", name))


def load_hf_model(hf_dir: str):
    """The transformers model of ``hf_dir`` (fp32, eager attention): its ``architectures`` class, or, for a
    directory with remote code (``auto_map``), the class ``auto_map`` names, loaded with trust_remote_code."""
    import transformers

    auto_map = registry.read_hf_config(hf_dir).get("auto_map") or {}
    kwargs = dict(dtype=torch.float32, attn_implementation="eager")
    for name in ("AutoModelForImageTextToText", "AutoModelForCausalLM"):
        if name in auto_map:
            return getattr(transformers, name).from_pretrained(hf_dir, trust_remote_code=True, **kwargs).eval()
    cfg = transformers.AutoConfig.from_pretrained(hf_dir)
    cls = getattr(transformers, cfg.architectures[0])
    model = cls.from_pretrained(hf_dir, **kwargs)
    return model.eval()


def verify(hf_dir: str, load: str, *, tp: int = 1, pp: int = 1, inputs_path: str | None = None,
           atol: float = 1e-6, num_llm_layers_in_first_stage: int | None = None,
           kernels: str = "torch", cp: int = 1, check_grads: bool = False) -> tuple[float, float]:
    """Run HF and our model (loaded from ``load`` at TP/PP/CP) on the same inputs; returns (max_abs, rel).

    ``check_grads`` (CP > 1): also compare every parameter gradient at CP with CP=1's (context_check.py)."""
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    meta = ckpt.read_meta(load)
    arch = registry.arch_from_hf_config(meta["hf_config"])
    spec = registry.spec_of(arch)
    layout = ParallelLayout(tp, pp, num_llm_layers_in_first_stage=num_llm_layers_in_first_stage)
    initialize_distributed(tp, pp, context_parallel_size=cp)  # context parallel: world = DP x CP x TP x PP
    model = spec.build_stage(arch, layout, kernels=kernels).eval()
    ckpt.load_model_weights(load, model)
    if inputs_path:
        if not os.path.isfile(inputs_path):
            raise FileNotFoundError(f"--inputs {inputs_path!r} not found")
        cases = {"inputs": torch.load(inputs_path, weights_only=False)}
    else:
        cases = spec.verify_inputs(arch)
    is_ref_rank = ps.is_pipeline_last_stage(ignore_virtual=True) and ps.get_tensor_model_parallel_rank() == 0 \
        and ps.get_context_parallel_rank() == 0
    hf_model = load_hf_model(hf_dir) if is_ref_rank else None
    worst_abs, worst_ref = 0.0, 0.0
    for name, inp in cases.items():
        inp = dict(inp)
        if spec.has_vision and "mm_token_type_ids" not in inp:  # transformers builds MRoPE ids only then
            from mllm_mega.models.positions import mm_token_type_ids

            inp["mm_token_type_ids"] = mm_token_type_ids(inp["input_ids"], arch.image_token_id,
                                                         arch.video_token_id)
        ids, pos, cu, index = spec.pack_hf_batch(
            arch, inp["input_ids"], inp.get("attention_mask"), inp.get("image_grid_thw"),
            inp.get("video_grid_thw"), inp.get("second_per_grid_ts"), pad_to_multiple=tp if cp == 1 else 1)
        batch = {"input_ids": ids, "position_ids": pos, "cu_seqlens": cu,
                 **{k: inp[k] for k in ("pixel_values", "image_grid_thw", "pixel_values_videos",
                                        "video_grid_thw") if k in inp}}
        if cp > 1:  # context parallel: this rank's slice (the trailing padding comes from the split)
            from mllm_mega.parallel.context_check import shard_for_rank

            batch = shard_for_rank(batch, arch, model.config)
        if torch.cuda.is_available():
            batch = {k: v.cuda() for k, v in batch.items()}
        # the whole sequence: megatron's get_tensor_shapes divides it by CP and, under SP, by TP itself
        seq = batch["input_ids"].shape[0] * cp
        with torch.no_grad():
            logits = forward_only(model, batch, seq)
        if ps.is_pipeline_last_stage(ignore_virtual=True):
            logits = tensor_parallel.gather_from_tensor_model_parallel_region(logits).float().cpu()
            if cp > 1:  # context parallel: every rank's tokens back in pack order
                from mllm_mega.parallel.context_check import gather_logits

                logits = gather_logits(logits, batch["context_parallel"], ids.shape[0])
        if is_ref_rank:
            with torch.no_grad():
                ref = hf_model(**inp).logits.float()
            ref = ref.reshape(-1, ref.shape[-1])[index]
            diff = (logits[: index.numel()] - ref).abs().max().item()
            worst_abs = max(worst_abs, diff)
            worst_ref = max(worst_ref, ref.abs().max().item())
            print(f"[verify] case={name} tokens={index.numel()} max_abs_diff={diff:.3e}", flush=True)
    result = torch.tensor([worst_abs, worst_ref], dtype=torch.float64)
    if dist.is_initialized():
        dist.all_reduce(result, op=dist.ReduceOp.MAX)
    max_abs, max_ref = result.tolist()
    if check_grads:  # context parallel: gradients at CP equal CP=1's
        from mllm_mega.parallel.context_check import compare_cp_grads

        compare_cp_grads(load, arch, cases, tp=tp, cp=cp, kernels=kernels)
    return max_abs, max_abs / max(max_ref, 1e-30)
