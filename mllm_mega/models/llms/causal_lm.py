"""Text-only causal LMs (transformers ``Qwen2ForCausalLM`` / ``Qwen3ForCausalLM``) on megatron-core: the
``qwen2`` and ``qwen3`` families' model, config parser, HF key map, verify inputs, FLOPs and tiny configs.

Same stage interface as the VLMs (``forward(input_ids, position_ids, cu_seqlens, ...)`` on one packed THD
sequence) so the trainer, verify and generation run unchanged; position ids are the data pipeline's three
rows, equal for text (1-D RoPE: ``mrope_section = [head_dim/2, 0, 0]`` reads only the first row).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from megatron.core.transformer.module import MegatronModule

from mllm_mega.models.llms.qwen import (
    LanguageModelStage, TextArch, build_language_model, llm_key_pairs, llm_transformer_config, qkv_from_megatron, qkv_to_megatron,
    rope_inv_freq, text_arch_from_hf,
)

TINY_VOCAB = 512
TINY_SPECIAL = {"bos_token_id": 504, "eos_token_id": 505}


@dataclass
class LMArch:
    """A text-only LLM: its family (qwen2 | qwen3) and shapes."""

    family: str
    text: TextArch
    hf_config: dict = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("hf_config")
        return d


def parse_hf_config(cfg: dict, *, family: str, kind: str) -> LMArch:
    tie = bool(cfg.get("tie_word_embeddings", False))
    return LMArch(family=family, text=text_arch_from_hf(cfg, kind=kind, tie=tie, where="", mrope=False),
                  hf_config=cfg)


def _common(params_dtype, use_cpu_initialization: bool, tp: int, pp: int) -> dict:
    return dict(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, params_dtype=params_dtype,
                bf16=params_dtype == torch.bfloat16, fp16=params_dtype == torch.float16, pipeline_dtype=params_dtype,
                use_cpu_initialization=use_cpu_initialization, hidden_dropout=0.0, attention_dropout=0.0,
                bias_dropout_fusion=False, apply_rope_fusion=False, masked_softmax_fusion=False,
                gradient_accumulation_fusion=False, persist_layer_norm=False, init_method_std=0.02)


def check_layout(arch: LMArch, layout, *, params_dtype=torch.float32, use_cpu_initialization: bool = True,
                 recompute_llm=None):
    """The LLM's megatron TransformerConfig at ``layout`` (a ValueError when the layout does not fit)."""
    common = _common(params_dtype, use_cpu_initialization, layout.tensor_model_parallel_size,
                     layout.pipeline_model_parallel_size)
    return llm_transformer_config(arch.text, layout, common, recompute_llm)


class CausalLM(LanguageModelStage, MegatronModule):
    """One pipeline stage of a text-only LLM (the whole model when PP=1)."""

    def __init__(self, arch: LMArch, llm_config, *, kernels: str, pre_process: bool, post_process: bool):
        super().__init__(config=llm_config)
        from megatron.core.enums import ModelType

        self.model_type = ModelType.encoder_or_decoder  # read by megatron's pipeline schedules
        self.arch, self.kernels = arch, kernels
        self.pre_process, self.post_process = pre_process, post_process
        self.vision = None
        self.language_model = build_language_model(arch.text, llm_config, kernels=kernels,
                                                   pre_process=pre_process, post_process=post_process)
        self.register_buffer("rope_inv_freq", rope_inv_freq(arch.text), persistent=False)
        self.share_embeddings_and_output_weights = arch.text.tie_word_embeddings

    def forward(self, input_ids, position_ids, cu_seqlens, max_seqlen=None, pixel_values=None,
                image_grid_thw=None, pixel_values_videos=None, video_grid_thw=None, context_parallel=None):
        """One packed sequence. Returns (T, vocab/TP) logits on the last stage, hidden states elsewhere.

        ``context_parallel``: this rank's CPShard; the token inputs are then its local slice."""
        from megatron.core import tensor_parallel

        from mllm_mega.models.common.attention import make_packed_seq_params

        for name, x in (("pixel_values", pixel_values), ("pixel_values_videos", pixel_values_videos)):
            if x is not None and x.numel() > 0:
                raise ValueError(f"{self.arch.family} is a text-only model but the batch has {name} "
                                 f"{tuple(x.shape)} (use text-only data)")
        if max_seqlen is None:
            max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
        params = make_packed_seq_params(cu_seqlens, max_seqlen, position_ids, self.rope_inv_freq,
                                        self.arch.text.mrope_section, context_parallel=context_parallel)
        decoder_input = None
        if self.pre_process:
            decoder_input = self.language_model.embedding(input_ids=input_ids.view(1, -1), position_ids=None)
            if self.config.sequence_parallel:
                decoder_input = tensor_parallel.scatter_to_sequence_parallel_region(decoder_input)
        out = self.language_model(input_ids=None, position_ids=None, attention_mask=None,
                                  decoder_input=decoder_input, packed_seq_params=params)
        return out[0] if self.post_process else out


def build_model(arch: LMArch, layout=None, *, kernels: str = "torch", params_dtype=torch.float32,
                recompute_vision=None, recompute_llm=None) -> CausalLM:
    """This rank's stage (megatron's parallel_state initialised); ``recompute_vision`` is ignored (no ViT)."""
    from megatron.core import parallel_state

    from mllm_mega.models.common.kernel_choice import resolve_kernels
    from mllm_mega.models.layout import ParallelLayout

    layout = layout or ParallelLayout(parallel_state.get_tensor_model_parallel_world_size(),
                                      parallel_state.get_pipeline_model_parallel_world_size())
    cfg = check_layout(arch, layout, params_dtype=params_dtype, use_cpu_initialization=not torch.cuda.is_available(),
                       recompute_llm=recompute_llm)
    model = CausalLM(arch, cfg, kernels=resolve_kernels(kernels),
                     pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=True),
                     post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=True))
    if torch.cuda.is_available():
        model.cuda(torch.cuda.current_device())
    return model


# ---- HF key map ---------------------------------------------------------------------------------------
def key_map(arch: LMArch):
    return llm_key_pairs(arch.text)


def hf_to_ours(arch: LMArch, get: Callable[[str], torch.Tensor], expected_shapes: dict | None = None
               ) -> Iterator[tuple[str, torch.Tensor]]:
    t = arch.text
    for ours, hf_keys, kind in key_map(arch):
        tensors = [get(k) for k in hf_keys]
        if kind == "qkv_split":
            out = qkv_to_megatron(*tensors, t.num_heads, t.num_kv_heads)
        else:
            out = torch.cat(tensors, dim=0) if kind == "glu" else tensors[0]
        want = (expected_shapes or {}).get(ours)
        if want is not None and tuple(out.shape) != tuple(want):
            shapes = ", ".join(f"{k} {tuple(x.shape)}" for k, x in zip(hf_keys, tensors))
            raise ValueError(f"HF tensor(s) {shapes} give shape {tuple(out.shape)} for {ours}, expected "
                             f"{tuple(want)} from config.json")
        yield ours, out


def ours_to_hf(arch: LMArch, get: Callable[[str], torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
    t = arch.text
    for ours, hf_keys, kind in key_map(arch):
        x = get(ours)
        if kind == "qkv_split":
            outs = list(qkv_from_megatron(x, t.num_heads, t.num_kv_heads))
        else:
            outs = list(torch.chunk(x, 2, dim=0)) if kind == "glu" else [x]
        for k, o in zip(hf_keys, outs):
            yield k, o.contiguous()


def normalize_hf_key(key: str) -> str:
    return key


def hf_key_is_known(key: str) -> bool:
    return key.startswith(("model.", "lm_head."))


# ---- inputs, positions, FLOPs ---------------------------------------------------------------------------
def verify_inputs(arch: LMArch) -> dict:
    """A single sequence and a right-padded batch of two, random text tokens."""
    g = torch.Generator().manual_seed(0)
    vocab = arch.text.vocab_size
    one = torch.randint(0, vocab, (1, 37), generator=g)
    batch = torch.randint(0, vocab, (2, 29), generator=g)
    mask = torch.ones_like(batch)
    mask[1, 17:] = 0
    return {"text": {"input_ids": one, "attention_mask": torch.ones_like(one)},
            "batch": {"input_ids": batch, "attention_mask": mask}}


def pack_hf_batch(arch: LMArch, input_ids, attention_mask=None, image_grid_thw=None, video_grid_thw=None,
                  second_per_grid_ts=None, pad_to_multiple: int = 1):
    """As the VLMs' ``pack_hf_batch``: (packed_ids, position_ids (3, T), cu_seqlens, token_index); positions
    0..n-1 per sample (what HF gives right-padded rows)."""
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    keep = attention_mask.bool()
    token_index = torch.nonzero(keep.reshape(-1)).squeeze(1)
    lens = keep.sum(1).tolist()
    ids = input_ids.reshape(-1)[token_index]
    pos = torch.cat([torch.arange(n) for n in lens]).expand(3, -1)
    bounds = torch.tensor([0] + lens).cumsum(0).tolist()
    pad = (-bounds[-1]) % pad_to_multiple
    if pad:
        ids, pos = torch.nn.functional.pad(ids, (0, pad)), torch.nn.functional.pad(pos, (0, pad))
        bounds.append(bounds[-1] + pad)
    return ids, pos.contiguous(), torch.tensor(bounds, dtype=torch.int32), token_index


def pack_flops(arch: LMArch, pack: dict, multipliers: dict[str, int]) -> float:
    from mllm_mega.models.llms.qwen import llm_forward_flops

    lens, real, kept = (pack["cu_seqlens"][1:] - pack["cu_seqlens"][:-1]).tolist(), int(pack["num_real_tokens"]), []
    for n in lens:  # samples first, then the padding segment
        if sum(kept) >= real:
            break
        kept.append(n)
    return multipliers["llm"] * sum(llm_forward_flops(arch.text, kept).values())


def module_groups(model) -> dict:
    return {"llm": list(model.parameters())}


# ---- tiny models ------------------------------------------------------------------------------------------
def tiny_config(architecture: str, model_type: str, *, tie_word_embeddings: bool = False, **overrides) -> dict:
    """A tiny config.json dict: GQA (4 query / 2 KV heads), 4 layers; Qwen3's head_dim 24 != 64 / 4."""
    cfg = {
        "architectures": [architecture], "model_type": model_type, "vocab_size": TINY_VOCAB, "hidden_size": 64,
        "intermediate_size": 112, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
        "hidden_act": "silu", "max_position_embeddings": 4096, "rms_norm_eps": 1e-6,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
        "tie_word_embeddings": tie_word_embeddings, "torch_dtype": "float32", **TINY_SPECIAL,
    }
    if model_type == "qwen3":
        cfg.update(head_dim=24, attention_bias=False)
    cfg.update(overrides)
    return cfg


def build_tiny_hf_model(architecture: str, model_type: str, seed: int = 0, **kwargs):
    """A randomly initialised transformers model of the tiny config (fp32, eager attention), norms randomised."""
    import transformers

    cfg = tiny_config(architecture, model_type, **kwargs)
    config = transformers.AutoConfig.for_model(model_type, **{k: v for k, v in cfg.items() if k != "model_type"})
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = getattr(transformers, architecture)(config).eval()
    with torch.no_grad():  # HF initialises norms to 1 and biases to 0: randomise them so parity sees them
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return model
