"""Build what a run trains: architecture, model stage, DDP wrapper, optimizer and LR schedule.

Order of application (one place, stated once): build this rank's pipeline stage with TP-split layers ->
load initial weights (HF-imported checkpoint or a previous stage) -> freeze per the stage -> wrap in
megatron's DistributedDataParallel (contiguous fp32 grad buffers, only trainable parameters) -> megatron's
optimizer (distributed optimizer: Adam state and fp32 master weights sharded over data-parallel ranks) with
parameter groups for weight decay (none on 1-d parameters and biases) and per-module LR multipliers.
"""
from __future__ import annotations

import json
import os

import torch

from mllm_mega.config import Config
from mllm_mega.models import registry
from mllm_mega.models.layout import ParallelLayout, Recompute
from mllm_mega.models.registry import MODULE_GROUPS

MODULES = MODULE_GROUPS


def resolve_dtype(cfg: Config) -> torch.dtype:
    if cfg.model.dtype == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return getattr(torch, cfg.model.dtype)


def arch_config_dict(cfg: Config, text) -> dict:
    """The HF config.json dict of the model to train; ``text`` is the data's TextProcessor."""
    arch = cfg.model.arch
    if cfg.model.init_from:
        from mllm_mega.training.checkpointing import read_meta

        hf = read_meta(cfg.model.init_from)["hf_config"]
    elif arch in registry.tiny_arch_names():
        spec = registry.get(arch[len("tiny_"):])
        hf = spec.tiny_config(**cfg.model.tiny_overrides)
        # size the vocabulary to the tokenizer (rounded up to 64: divisible by any TP) and take its special ids
        vocab = -(-text.vocab_size // 64) * 64
        text_cfg = hf.get("text_config", hf)  # VLM configs nest the LLM's keys, plain LLM configs do not
        text_cfg["vocab_size"] = vocab
        if spec.has_vision:
            hf.update(vision_start_token_id=text.vision_start_id, vision_end_token_id=text.vision_end_id,
                      image_token_id=text.image_token_id, video_token_id=text.video_token_id)
        for where in (hf, text_cfg):
            where.update(bos_token_id=text.end_of_text_id, eos_token_id=text.end_of_text_id)
    else:
        path = os.path.join(arch, "config.json") if os.path.isdir(arch) else arch
        if not os.path.isfile(path):
            raise FileNotFoundError(f"model.arch={arch!r}: expected one of {registry.tiny_arch_names()} or a HF "
                                    "config.json / model dir")
        with open(path) as f:
            hf = json.load(f)
    return hf


def apply_arch_overrides(hf: dict, overrides: dict, parse):
    """``parse(hf)`` with ``model.arch_overrides`` set as config.json keys (so the arch's ``hf_config``, which
    checkpoints and exports carry, has them); a key that is not an arch field the parser reads is an error."""
    import copy
    import dataclasses
    import difflib

    base = parse(hf)
    names = [f.name for f in dataclasses.fields(base) if f.name not in ("family", "hf_config")]
    for key in overrides:
        if key not in names:
            near = difflib.get_close_matches(key, names, n=1)
            raise ValueError(f"model.arch_overrides.{key}: not a field of the {base.family} architecture "
                             f"({names})" + (f"; did you mean {near[0]!r}?" if near else ""))
    arch = parse({**copy.deepcopy(hf), **copy.deepcopy(overrides)})
    for key, value in overrides.items():
        if getattr(arch, key) != value:
            raise ValueError(f"model.arch_overrides.{key}={value!r}: the {base.family} family does not read "
                             f"config.json key {key!r} into that field (it parsed {getattr(arch, key)!r})")
    return arch


def resolve_arch(cfg: Config, text):
    """The parsed architecture (its family's type) of the model to train, checked against the tokenizer."""
    hf = arch_config_dict(cfg, text)
    parse = registry.get(cfg.model.family).parse_hf_config if cfg.model.family else registry.arch_from_hf_config
    arch = apply_arch_overrides(hf, cfg.model.arch_overrides, parse) if cfg.model.arch_overrides else parse(hf)
    checks = [] if not registry.spec_of(arch).has_vision else [
        ("image_token_id", arch.image_token_id, text.image_token_id),
        ("video_token_id", arch.video_token_id, text.video_token_id),
        ("vision_start_token_id", arch.vision_start_token_id, text.vision_start_id)]
    for name, ours, theirs in checks:
        if ours != theirs:
            raise ValueError(f"model {name}={ours} but the tokenizer {cfg.data.tokenizer_dir!r} gives {theirs}")
    if text.vocab_size > arch.text.vocab_size:
        raise ValueError(f"tokenizer has {text.vocab_size} tokens but the model's vocab_size is "
                         f"{arch.text.vocab_size}")
    return arch


def recompute_of(cfg: Config) -> dict:
    """build_model's recompute_vision / recompute_llm from the config."""
    m = cfg.model
    return {f"recompute_{tower}": Recompute(getattr(m, f"recompute_{tower}"), m.recompute_method,
                                            m.recompute_num_layers) for tower in ("vision", "llm")}


def layout_of(cfg: Config) -> ParallelLayout:
    p = cfg.parallel
    return ParallelLayout(p.tp, p.pp, sequence_parallel=p.sequence_parallel,
                          num_llm_layers_in_first_stage=p.num_llm_layers_in_first_stage)


def module_groups(model) -> dict[str, list]:
    """{group: parameters} of this stage, as the model's family names its modules (``MODULE_GROUPS``); every
    parameter is in exactly one group (a ValueError names any that is not)."""
    groups = registry.spec_of(model.arch).module_groups(model)
    unknown = sorted(set(groups) - set(registry.spec_of(model.arch).groups))
    if unknown:
        raise ValueError(f"family {model.arch.family}: module groups {unknown} not among its declared groups")
    seen: dict[int, str] = {}
    for group, params in groups.items():
        for p in params:
            if id(p) in seen:
                raise ValueError(f"a parameter is in module groups {seen[id(p)]!r} and {group!r}")
            seen[id(p)] = group
    stray = [n for n, p in model.named_parameters() if id(p) not in seen]
    if stray:
        raise ValueError(f"parameters in no module group: {stray[:5]}")
    return {g: groups.get(g, []) for g in MODULE_GROUPS}


def frozen_groups(arch, cfg: Config) -> dict[str, bool]:
    """stage.freeze_<group> per group of the whole model (not of one pipeline stage); a group the family does
    not have (e.g. vision in a text-only LLM) counts as frozen: nothing there trains."""
    present = registry.spec_of(arch).groups
    return {g: getattr(cfg.stage, f"freeze_{g}") or g not in present for g in MODULE_GROUPS}


def apply_freeze(model, cfg: Config) -> dict[str, int]:
    """Set requires_grad per the stage; returns trainable parameter counts per module group (this rank)."""
    counts = dict.fromkeys(MODULES, 0)
    for group, params in module_groups(model).items():
        frozen = getattr(cfg.stage, f"freeze_{group}")
        for p in params:
            p.requires_grad_(not frozen)
            if p.requires_grad:
                counts[group] += p.numel()
    return counts


def wrap_ddp(model, cfg: Config):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed import finalize_model_grads

    p = cfg.parallel
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,  # fp32 main grads (the DDP buffers) also for bf16 parameters
        overlap_grad_reduce=p.overlap_grad_reduce,
        overlap_param_gather=p.overlap_param_gather,
        use_distributed_optimizer=p.distributed_optimizer,
        check_for_nan_in_grad=False,  # our NaN guard skips the step instead of raising
        bucket_size=p.ddp_bucket_size,  # megatron: one bucket unless overlapping, then max(40M, 1M x DP)
    )
    config = model.config
    # the loss is already divided by the global weight sum: megatron must neither average over
    # micro-batches nor over data-parallel ranks (calculate_per_token_loss turns both off)
    config.calculate_per_token_loss = True
    config.finalize_model_grads_func = finalize_model_grads  # waits for (or runs) the grad reduction
    ddp = DistributedDataParallel(config=config, ddp_config=ddp_config, module=model)
    if p.overlap_grad_reduce:
        # the schedules run every micro-batch but the last under no_sync, so a bucket is reduced once per
        # step, when its grads of the last micro-batch are ready (as Megatron-LM's training loop sets it)
        config.no_sync_func = ddp.no_sync
    # overlap_param_gather: the optimizer step skips the all-gather; DDP's forward pre-hooks gather each
    # bucket before its first use, and the trainer forces a synchronous gather before saving
    return ddp


def build_optimizer(ddp_model, cfg: Config, params_dtype: torch.dtype):
    """megatron optimizer + OptimizerParamScheduler with WD groups and per-module LR multipliers."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer.optimizer_config import ParamKey, ParamPredicate, ParamWithNamePredicate
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler, ParamGroupOverride

    o = cfg.optimizer
    opt_config = OptimizerConfig(
        optimizer="adam", lr=o.lr, min_lr=o.min_lr, weight_decay=o.weight_decay, adam_beta1=o.adam_beta1,
        adam_beta2=o.adam_beta2, adam_eps=o.adam_eps, clip_grad=o.clip_grad,
        bf16=params_dtype == torch.bfloat16, fp16=False, params_dtype=params_dtype,
        use_distributed_optimizer=cfg.parallel.distributed_optimizer,
    )
    overrides = {
        ParamKey(name="*.bias", predicate=ParamPredicate(name="dim1", fn=lambda p: p.dim() == 1)):
            ParamGroupOverride(wd_mult=0.0),
    }
    for module, params in module_groups(ddp_model.module).items():
        mult = getattr(cfg.stage, f"lr_mult_{module}")
        if mult != 1.0 and params:
            ids = frozenset(id(p) for p in params)  # by parameter identity, not by name
            pred = ParamWithNamePredicate(name=f"in_{module}", fn=lambda p, n, ids=ids: id(p) in ids)
            overrides[ParamKey(with_name_predicate=pred)] = ParamGroupOverride(max_lr=o.lr * mult,
                                                                               min_lr=o.min_lr * mult)
    optimizer = get_megatron_optimizer(opt_config, [ddp_model], config_overrides=overrides)
    decay_steps = o.decay_steps or cfg.train.max_steps
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=o.lr, min_lr=o.min_lr, lr_warmup_steps=o.warmup_steps,
        lr_decay_steps=max(decay_steps, o.warmup_steps + 1), lr_decay_style=o.decay_style,
        start_wd=o.weight_decay, end_wd=o.weight_decay, wd_incr_steps=decay_steps, wd_incr_style="constant",
        use_checkpoint_opt_param_scheduler=False, override_opt_param_scheduler=True,
    )
    return optimizer, scheduler

