"""Run configuration: one typed dataclass per concern, read from YAML with ``dotted.key=value`` overrides.

    cfg = load_config("examples/configs/tiny_synthetic.yaml", ["train.max_steps=20", "run_dir=runs/x"])

Every section is validated in its own ``__post_init__``; an unknown or mistyped key anywhere (file or
override) is an error naming the key and the nearest valid one. ``cfg.to_dict()`` is the fully resolved
config the trainer writes into the run directory. Stage presets (InternVL2.5's recipe: stage 1 projector
warm-up, stage 1.5 ViT incremental learning, stage 2 full tuning) fill the freeze flags and LR multipliers
that a config leaves unset.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
from dataclasses import dataclass, field
from typing import Any

from mllm_mega.data.config import DataConfig
from mllm_mega.models.registry import tiny_arch_names
from mllm_mega.objectives.config import ObjectiveConfig

KERNELS = ("auto", "torch", "triton")
DTYPES = ("auto", "float32", "bfloat16")
RECOMPUTE = ("none", "selective", "full")

# stage -> (freeze_vision, freeze_merger, freeze_llm, lr_mult_vision, lr_mult_merger, lr_mult_llm)
STAGE_PRESETS = {
    "projector": (True, False, True, 1.0, 1.0, 1.0),      # stage 1: MLP warm-up, frozen ViT and LLM
    "vit_projector": (False, False, True, 0.1, 1.0, 1.0),  # stage 1.5: ViT incremental learning, lower LR
    "full": (False, False, False, 0.1, 1.0, 1.0),          # stage 2: everything trains, ViT at a lower LR
}


@dataclass
class ModelConfig:
    """Which model to build and where its weights come from."""

    arch: str = "tiny_qwen2_5_vl"
    """tiny_<family> for any registered family (e.g. tiny_qwen2_5_vl, tiny_qwen2_vl; sized to the tokenizer), or
    a HF config.json / model directory."""
    family: str | None = None
    """Model family (a name in mllm_mega.models.registry) to read the HF config with; None = found from the
    config's architectures / model_type (a tiny_<family> arch names its own)."""
    init_from: str | None = None
    """Checkpoint to start from (HF-imported or a previous stage's run dir); None = random init (std 0.02)."""
    kernels: str = "auto"
    """torch | triton | auto (triton on CUDA): attention, RoPE, RMSNorm and the loss slot."""
    dtype: str = "auto"
    """Parameter/compute dtype: auto (bfloat16 on GPU with fp32 master weights, float32 on CPU)."""
    tiny_overrides: dict = field(default_factory=dict)
    """Overrides of the tiny text config (e.g. hidden_size, num_hidden_layers); tiny archs only."""
    arch_overrides: dict = field(default_factory=dict)
    """Architecture fields set through the model's config.json before it is parsed, for any arch (tiny, HF
    config, init_from checkpoint): each key must be a field of the family's arch that its parser reads from the
    config.json key of the same name, e.g. ``{projector_pool_grid: 12}`` (open_qwen2vl: 12 x 12 = 144 tokens per
    image; the patch grid, 27, gives 729 with the same weights). Saved with the checkpoint's config."""
    recompute_llm: str = "none"
    """Activation recomputation in the LLM: none | selective (megatron's core_attn recompute: our RoPE +
    packed-attention slot is re-run in the backward) | full (whole layers re-run, see recompute_method)."""
    recompute_vision: str = "none"
    """The same for the ViT layers: none | selective | full."""
    recompute_method: str = "uniform"
    """Full recompute only: uniform (every layer, in chunks of recompute_num_layers) | block (only the first
    recompute_num_layers layers of each pipeline stage, and of the ViT)."""
    recompute_num_layers: int = 1
    """Full recompute only: layers per checkpointed chunk (uniform; must divide the layers per stage) or
    layers recomputed per stage (block)."""

    def __post_init__(self):
        _choice("model.kernels", self.kernels, KERNELS)
        _choice("model.dtype", self.dtype, DTYPES)
        for name in ("recompute_llm", "recompute_vision"):
            _choice(f"model.{name}", getattr(self, name), RECOMPUTE)
        _choice("model.recompute_method", self.recompute_method, ("uniform", "block"))
        _positive("model", self, "recompute_num_layers")
        if self.family is not None and f"tiny_{self.family}" not in tiny_arch_names():
            names = [n[len("tiny_"):] for n in tiny_arch_names()]
            near = difflib.get_close_matches(self.family, names, n=1)
            raise ValueError(f"model.family={self.family!r} is not a registered family ({names})"
                             + (f"; did you mean {near[0]!r}?" if near else ""))
        if self.tiny_overrides and self.arch not in tiny_arch_names():
            raise ValueError(f"model.tiny_overrides only applies to {tiny_arch_names()}, not arch={self.arch!r}")


@dataclass
class ParallelConfig:
    """Tensor / pipeline / context / data parallel layout (DP = world size / (TP * PP * CP))."""

    tp: int = 1
    """Tensor-parallel size (LLM and ViT weights split; sequence parallel in the LLM)."""
    pp: int = 1
    """Pipeline-parallel size (the ViT and merger sit on the first stage)."""
    sequence_parallel: bool = True
    """Megatron sequence parallelism in the LLM when tp > 1."""
    num_llm_layers_in_first_stage: int | None = None
    """LLM layers on the first stage (which also runs the ViT); None = even split."""
    cp: int = 1
    """Context-parallel size: each packed sample split into 2*cp chunks, rank r holding chunks r and 2cp-1-r
    (load-balanced causal attention over all-gathered K/V); media split over the CP ranks for the ViT."""
    distributed_optimizer: bool = True
    """Shard optimizer state and fp32 master weights over data-parallel ranks (ZeRO-1)."""
    overlap_grad_reduce: bool = False
    """Reduce(-scatter) each gradient bucket over DP as soon as its grads are ready, during the backward."""
    overlap_param_gather: bool = False
    """Distributed optimizer: all-gather the updated parameters bucket by bucket during the next forward
    instead of at the end of the optimizer step (needs distributed_optimizer and overlap_grad_reduce)."""
    ddp_bucket_size: int | None = None
    """Parameters per gradient/parameter bucket when overlapping; None = megatron's max(40M, 1M x DP)."""

    def __post_init__(self):
        _positive("parallel", self, "tp", "pp", "cp")
        if self.overlap_param_gather and not (self.distributed_optimizer and self.overlap_grad_reduce):
            raise ValueError("parallel.overlap_param_gather needs parallel.distributed_optimizer and "
                             "parallel.overlap_grad_reduce")
        if self.ddp_bucket_size is not None:
            _positive("parallel", self, "ddp_bucket_size")


@dataclass
class StageConfig:
    """Training stage: what trains and at which learning-rate multiplier (unset values come from the preset)."""

    name: str = "full"
    """projector (stage 1) | vit_projector (stage 1.5) | full (stage 2)."""
    freeze_vision: bool | None = None
    freeze_merger: bool | None = None
    freeze_llm: bool | None = None
    lr_mult_vision: float | None = None
    lr_mult_merger: float | None = None
    lr_mult_llm: float | None = None

    def __post_init__(self):
        _choice("stage.name", self.name, tuple(STAGE_PRESETS))
        preset = STAGE_PRESETS[self.name]
        names = ("freeze_vision", "freeze_merger", "freeze_llm", "lr_mult_vision", "lr_mult_merger", "lr_mult_llm")
        for name, value in zip(names, preset):
            if getattr(self, name) is None:
                setattr(self, name, value)
        for name in names[3:]:
            if not getattr(self, name) > 0:
                raise ValueError(f"stage.{name} must be > 0, got {getattr(self, name)}")
        if self.freeze_vision and self.freeze_merger and self.freeze_llm:
            raise ValueError("stage: every module is frozen (freeze_vision, freeze_merger, freeze_llm); nothing to train")


@dataclass
class TrainConfig:
    """Steps, batch, and the resilience knobs."""

    max_steps: int = 100
    """Optimizer steps of the run (the LR schedule decays over these unless optimizer.decay_steps is set)."""
    global_batch_size: int = 1
    """Packed sequences (of data.seq_len tokens) per optimizer step, over all data-parallel ranks."""
    micro_batch_size: int = 1
    """Packed sequences concatenated into one forward/backward (THD, attention never crosses samples)."""
    exit_interval: int | None = None
    """Save and exit after an iteration that is a multiple of this (Megatron's --exit-interval): split a run
    over several jobs; the next launch resumes."""
    max_consecutive_nan_steps: int = 5
    """Stop after this many steps in a row whose loss or gradients are NaN/Inf (each one is skipped)."""
    inject_nan_at: list[int] = field(default_factory=list)
    """Testing aid: iterations (1-based) whose loss is made NaN, to exercise the NaN guard."""
    inject_nan_grad_at: list[int] = field(default_factory=list)
    """Testing aid: iterations (1-based) where one gradient element on global rank 0 only is made NaN after the
    backward pass (the loss stays finite), to exercise the gradient half of the NaN guard."""
    same_data_at_any_dp: bool = False
    """Testing aid: every DP rank reads the whole (DP-size-1) data stream and keeps its share of each global
    batch, so runs at different DP sizes see the same global batches (DP x the data work)."""
    allow_config_change: bool = False
    """Resume even when seed, global batch size, data paths/seed, seq_len, loss reweighting or the model arch
    changed (logged with the old and new values); by default such a resume is refused (exit 2)."""
    eval_num_captions: int = 4
    """Held-out images captioned with greedy decoding at the end of the run (0 = none)."""
    eval_max_new_tokens: int = 24
    """Longest generated caption."""

    def __post_init__(self):
        _positive("train", self, "max_steps", "global_batch_size", "micro_batch_size", "max_consecutive_nan_steps",
                  "eval_max_new_tokens")
        if self.global_batch_size % self.micro_batch_size:
            raise ValueError(f"train.global_batch_size ({self.global_batch_size}) must be a multiple of "
                             f"train.micro_batch_size ({self.micro_batch_size})")
        if self.exit_interval is not None and (isinstance(self.exit_interval, bool) or
                                               not isinstance(self.exit_interval, int) or self.exit_interval < 1):
            raise ValueError(f"train.exit_interval must be None or a positive int, got {self.exit_interval!r}")
        if self.eval_num_captions < 0:
            raise ValueError(f"train.eval_num_captions must be >= 0, got {self.eval_num_captions}")


@dataclass
class OptimizerConfig:
    """AdamW with warmup + cosine (or linear/constant) decay, weight-decay groups and clipping."""

    lr: float = 1e-4
    """Peak learning rate (before the stage's per-module multipliers)."""
    min_lr: float = 0.0
    """Final learning rate of the decay."""
    warmup_steps: int = 0
    """Linear warmup from 0 to lr."""
    decay_style: str = "cosine"
    """cosine | linear | constant."""
    decay_steps: int | None = None
    """Steps of warmup + decay; None = train.max_steps."""
    weight_decay: float = 0.0
    """Decoupled weight decay; never applied to biases and norm weights (1-d parameters)."""
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    """Global gradient-norm clip (0 disables)."""

    def __post_init__(self):
        _choice("optimizer.decay_style", self.decay_style, ("cosine", "linear", "constant"))
        if not self.lr > 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise ValueError(f"optimizer: need lr > 0 and 0 <= min_lr <= lr, got lr={self.lr}, min_lr={self.min_lr}")
        if self.warmup_steps < 0 or self.weight_decay < 0 or self.clip_grad < 0:
            raise ValueError("optimizer.warmup_steps, weight_decay and clip_grad must be >= 0")


@dataclass
class CheckpointConfig:
    """Where and how often to save; resume is automatic from ``run_dir/checkpoints``."""

    save_interval: int = 100
    """Save every K steps (and at the end, and on SIGTERM/SIGUSR1)."""
    keep_last: int = 2
    """Checkpoints kept (the newest complete one is never deleted)."""
    resume: bool = True
    """Resume from the run directory's latest checkpoint when there is one."""
    async_save: str = "auto"
    """auto (on GPU) | true | false: write checkpoints in a background process while training continues."""
    save_on_exit: bool = True
    """Save when training ends."""
    save_initial: bool = False
    """Also save iteration 0 (the initial weights), e.g. to start runs at other layouts from the same point."""
    optimizer_sharding: str = "dp_reshardable"
    """Distributed-optimizer state layout: dp_reshardable (fully parallel; resume at another DP size) or
    fully_reshardable (gathered per DP group; resume at another TP/PP too). Weights reshard either way."""

    def __post_init__(self):
        _positive("checkpoint", self, "save_interval", "keep_last")
        _choice("checkpoint.optimizer_sharding", self.optimizer_sharding, ("dp_reshardable", "fully_reshardable"))
        self.async_save = str(self.async_save).lower()
        _choice("checkpoint.async_save", self.async_save, ("auto", "true", "false"))


@dataclass
class LoggingConfig:
    """Console, TensorBoard and metrics.jsonl."""

    log_interval: int = 1
    """Steps between console lines (metrics.jsonl gets every step)."""
    tensorboard: bool = True
    """Write TensorBoard events to run_dir/tensorboard (when tensorboard is installed)."""
    peak_tflops: float | None = None
    """Per-device dense peak for MFU; None = known GPUs' bf16 peak (H100/H200 989), no MFU on CPU."""
    wandb_project: str | None = None
    """Weights & Biases project: also log every step there (when ``wandb`` is installed); None = no W&B."""
    wandb_entity: str | None = None
    """W&B entity (team or user); None = wandb's default."""
    wandb_run_name: str | None = None
    """W&B run name; None = the run directory's name. A resumed run continues the same W&B run."""
    wandb_mode: str | None = None
    """online | offline (no network; `wandb sync` later) | disabled; None = wandb's default / $WANDB_MODE."""

    def __post_init__(self):
        _positive("logging", self, "log_interval")
        if self.wandb_mode is not None:
            _choice("logging.wandb_mode", self.wandb_mode, ("online", "offline", "disabled"))


@dataclass
class SyntheticConfig:
    """The synthetic shapes dataset generated on first use (see tools/make_synthetic_dataset.py)."""

    dir: str | None = None
    """Dataset directory; when set, empty data paths default into it and it is generated if absent."""
    num: int = 2000
    num_eval: int = 16
    seed: int = 0
    image_size: list[int] = field(default_factory=lambda: [56, 112])
    multi_image_frac: float = 0.1
    caption_frac: float = 0.5
    pair_attributes: list[str] = field(default_factory=lambda: ["colour", "count", "kind", "region"])
    """With data.preference: the attributes a rejected caption may change (colour, count, kind, region)."""

    def __post_init__(self):
        from mllm_mega.data.synthetic import check_pair_attributes

        try:
            check_pair_attributes(self.pair_attributes)
        except ValueError as e:
            raise ValueError(f"synthetic.pair_attributes: {e}") from None


@dataclass
class Config:
    """A training run."""

    run_dir: str = "runs/default"
    """Checkpoints, resolved config, metrics.jsonl, TensorBoard events, captions."""
    seed: int = 1234
    """Seed of the initial weights and of every RNG (data order and augmentation have data.seed)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    stage: StageConfig = field(default_factory=StageConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    data: DataConfig = field(default_factory=DataConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)

    def __post_init__(self):
        o = self.objective
        if o.name == "preference" and self.parallel.cp > 1:
            raise ValueError("objective.name=preference does not support context parallel (parallel.cp="
                             f"{self.parallel.cp}): use parallel.cp=1")
        if o.name == "preference" and not self.data.preference:
            raise ValueError("objective.name=preference trains on preference pairs: set data.preference=true")
        if o.name == "preference" and o.reference == "resident" and self.parallel.pp > 1:
            raise ValueError(f"objective.reference=resident needs parallel.pp=1 (got {self.parallel.pp}): the "
                             "reference forward is not pipelined; precompute the reference log-probs "
                             "(tools/precompute_ref_logps.py) and set objective.reference=precomputed")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


SECTIONS = {f.name: f for f in dataclasses.fields(Config)}


def _section_class(name: str):
    return {"model": ModelConfig, "parallel": ParallelConfig, "stage": StageConfig, "train": TrainConfig,
            "optimizer": OptimizerConfig, "checkpoint": CheckpointConfig, "logging": LoggingConfig,
            "synthetic": SyntheticConfig, "data": DataConfig, "objective": ObjectiveConfig}.get(name)


def _valid_keys() -> list[str]:
    keys = []
    for name in SECTIONS:
        cls = _section_class(name)
        if cls is None:
            keys.append(name)
        else:
            keys += [f"{name}.{f.name}" for f in dataclasses.fields(cls)]
    return keys


def _unknown(key: str, where: str) -> ValueError:
    near = difflib.get_close_matches(key, _valid_keys(), n=1, cutoff=0.5)
    hint = f"; did you mean {near[0]!r}?" if near else ""
    return ValueError(f"unknown config key {key!r} ({where}){hint}")


def parse_value(text: str) -> Any:
    """An override's value, parsed as YAML (so 3, 1e-4, true, null, [1, 2] and strings all work)."""
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _flatten(values: dict, where: str) -> dict[str, Any]:
    """{"train": {"max_steps": 3}} -> {"train.max_steps": 3}, checking every key on the way."""
    flat = {}
    if not isinstance(values, dict):
        raise ValueError(f"{where}: expected a mapping of config sections, got {type(values).__name__}")
    for key, value in values.items():
        if key not in SECTIONS:
            raise _unknown(str(key), where)
        cls = _section_class(key)
        if cls is None:
            flat[key] = value
            continue
        if value is None:
            continue
        if not isinstance(value, dict):
            raise ValueError(f"{where}: section {key!r} must be a mapping, got {value!r}")
        names = {f.name for f in dataclasses.fields(cls)}
        for sub, v in value.items():
            if sub not in names:
                raise _unknown(f"{key}.{sub}", where)
            flat[f"{key}.{sub}"] = v
    return flat


def load_config(path: str | None, overrides: list[str] = ()) -> Config:
    """YAML file (optional) + ``dotted.key=value`` overrides -> validated Config."""
    import yaml

    flat: dict[str, Any] = {}
    if path is not None:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"config file {path!r} not found")
        with open(path) as f:
            try:
                values = yaml.safe_load(f) or {}
            except yaml.YAMLError as e:
                raise ValueError(f"{path}: not valid YAML ({e})") from None
        flat.update(_flatten(values, path))
    valid = set(_valid_keys())
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like dotted.key=value")
        key, text = item.split("=", 1)
        if key not in valid:
            raise _unknown(key, "command line")
        flat[key] = parse_value(text)
    return config_from_flat(flat)


def config_from_flat(flat: dict[str, Any]) -> Config:
    sections: dict[str, dict] = {}
    top = {}
    for key, value in flat.items():
        if "." in key:
            section, sub = key.split(".", 1)
            sections.setdefault(section, {})[sub] = value
        else:
            top[key] = value
    built = {}
    for name, values in sections.items():
        cls = _section_class(name)
        values = {k: _coerce(cls, name, k, v) for k, v in values.items()}
        try:
            built[name] = cls.from_dict(values) if cls is DataConfig else cls(**values)
        except TypeError as e:
            raise ValueError(f"config section {name!r}: {e}") from None
    cfg = Config(**top, **built)
    _apply_synthetic_defaults(cfg)
    return cfg


def _coerce(cls, section: str, key: str, value):
    """YAML reads ``1e-4`` as a string (YAML 1.1): turn numbers written that way into the field's float."""
    ftype = str({f.name: f.type for f in dataclasses.fields(cls)}[key])
    if "float" in ftype and not isinstance(value, bool) and isinstance(value, (int, str)):
        try:
            return float(value)
        except ValueError:
            if ftype.startswith("float") and "None" not in ftype:
                raise ValueError(f"{section}.{key} must be a number, got {value!r}") from None
    return value


def _apply_synthetic_defaults(cfg: Config) -> None:
    d = cfg.synthetic.dir
    if not d:
        return
    if not cfg.data.data_path and not cfg.data.datasets:
        cfg.data.data_path = os.path.join(d, "train")
    if not cfg.data.tokenizer_dir:
        cfg.data.tokenizer_dir = os.path.join(d, "tokenizer")
    if not cfg.data.eval_data_path and cfg.synthetic.num_eval:
        cfg.data.eval_data_path = os.path.join(d, "eval")


def _choice(name: str, value, choices):
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def _positive(section: str, obj, *names):
    for name in names:
        value = getattr(obj, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{section}.{name} must be a positive int, got {value!r}")
