"""The Qwen2 / Qwen3 decoder LLM as a reusable part: shapes from a HF config, megatron-core config and layer
spec, the ``GPTModel`` of one pipeline stage, its HF key map and its FLOPs.

Qwen2: QKV bias, head_dim = hidden / heads. Qwen3 (transformers ``Qwen3Model``): no QKV bias, RMSNorm over
head_dim on every query and key head before RoPE (``q_norm`` / ``k_norm``; megatron's ``q_layernorm`` /
``k_layernorm`` slots with ``qk_layernorm=True``), ``head_dim`` set independently of hidden / heads
(megatron's ``kv_channels``). Both: GQA, SwiGLU, RMSNorm, RoPE applied in our packed-attention slot from 3
position rows (MRoPE; three equal rows = 1-D RoPE, which text-only families use).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

LLM_KINDS = ("qwen2", "qwen3")


@dataclass
class TextArch:
    """Qwen2 / Qwen3 LLM shapes."""

    vocab_size: int
    hidden_size: int
    ffn_hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1000000.0
    mrope_section: list[int] = field(default_factory=lambda: [16, 24, 24])
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 32768
    hidden_act: str = "silu"
    kv_channels: int | None = None  # None: hidden_size // num_heads (Qwen2); Qwen3 sets head_dim explicitly
    qk_norm: bool = False  # Qwen3's per-head q/k RMSNorm
    qkv_bias: bool = True  # Qwen2 has QKV bias, Qwen3 not

    @property
    def head_dim(self) -> int:
        return self.kv_channels or self.hidden_size // self.num_heads


def _need(cfg: dict, key: str, where: str):
    if key not in cfg:
        raise ValueError(f"config.json: missing required key {where}{key!r}")
    return cfg[key]


def text_arch_from_hf(text_cfg: dict, *, kind: str, tie: bool, where: str = "text_config.",
                      mrope: bool = True) -> TextArch:
    """Parse the LLM keys of a HF config (``text_config`` of a VLM, or a whole ``Qwen*ForCausalLM`` config).

    ``mrope=False`` (text-only models): positions are 1-D, given as three equal rows, all frequencies reading
    the first (``mrope_section = [head_dim/2, 0, 0]``).
    """
    if kind not in LLM_KINDS:
        raise ValueError(f"LLM kind {kind!r}; expected one of {LLM_KINDS}")
    rope = text_cfg.get("rope_parameters") or text_cfg.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "mrope"):
        raise ValueError(f"config.json: rope type {rope_type!r} is not supported (only default RoPE / MRoPE)")
    if text_cfg.get("use_sliding_window"):
        raise ValueError(f"config.json: {where}use_sliding_window=true is not supported")
    hidden = _need(text_cfg, "hidden_size", where)
    num_heads = _need(text_cfg, "num_attention_heads", where)
    head_dim = text_cfg.get("head_dim") if kind == "qwen3" else None
    head_dim = head_dim or hidden // num_heads
    section = list(rope.get("mrope_section", [16, 24, 24])) if mrope else [head_dim // 2, 0, 0]
    text = TextArch(
        vocab_size=_need(text_cfg, "vocab_size", where),
        hidden_size=hidden,
        ffn_hidden_size=_need(text_cfg, "intermediate_size", where),
        num_layers=_need(text_cfg, "num_hidden_layers", where),
        num_heads=num_heads,
        num_kv_heads=text_cfg.get("num_key_value_heads", num_heads),
        rms_norm_eps=text_cfg.get("rms_norm_eps", 1e-6),
        rope_theta=float(rope.get("rope_theta", text_cfg.get("rope_theta", 1000000.0))),
        mrope_section=section,
        tie_word_embeddings=tie,
        max_position_embeddings=text_cfg.get("max_position_embeddings", 32768),
        hidden_act=text_cfg.get("hidden_act", "silu"),
        kv_channels=head_dim if kind == "qwen3" else None,
        qk_norm=kind == "qwen3",
        qkv_bias=bool(text_cfg.get("attention_bias", False)) if kind == "qwen3" else True,
    )
    if text.hidden_act != "silu":
        raise ValueError(f"config.json: {where}hidden_act {text.hidden_act!r} not supported (silu)")
    if text.num_heads % text.num_kv_heads:
        raise ValueError(f"config.json: {where}num_attention_heads must be a multiple of num_key_value_heads")
    if sum(text.mrope_section) * 2 != text.head_dim:
        raise ValueError(f"rope_parameters.mrope_section {text.mrope_section} must sum to head_dim/2 = "
                         f"{text.head_dim // 2}")
    return text


def llm_transformer_config(t: TextArch, layout, common: dict, recompute_llm=None):
    """megatron-core ``TransformerConfig`` of the LLM (``common``: precision and fusion flags shared by towers)."""
    import torch.nn.functional as F
    from megatron.core.transformer.transformer_config import TransformerConfig

    from mllm_mega.models.layout import _recompute_kwargs

    tp, pp = layout.tensor_model_parallel_size, layout.pipeline_model_parallel_size
    if t.num_kv_heads % tp or t.num_heads % tp:
        raise ValueError(f"LLM heads {t.num_heads}/{t.num_kv_heads} (q/kv) not divisible by TP={tp}")
    if t.vocab_size % tp:
        raise ValueError(f"vocab_size {t.vocab_size} not divisible by TP={tp}")
    first = layout.num_llm_layers_in_first_stage
    extra = {}
    if pp > 1 and first is not None:
        rest = t.num_layers - first
        if first < 0 or rest < 0 or rest % (pp - 1):
            raise ValueError(
                f"num_llm_layers_in_first_stage={first}: the other {rest} LLM layers must split evenly "
                f"over the remaining {pp - 1} stages"
            )
        extra["num_layers_in_first_pipeline_stage"] = first
        local_layers = [first, rest // (pp - 1)]
    elif t.num_layers % pp:
        raise ValueError(f"{t.num_layers} LLM layers do not split evenly over PP={pp}; "
                         "set num_llm_layers_in_first_stage")
    else:
        local_layers = [t.num_layers // pp]
    for n in sorted({x for x in local_layers if x > 0}):  # full recompute must fit every stage's layers
        extra.update(_recompute_kwargs(recompute_llm, n, "llm"))
    return TransformerConfig(
        num_layers=t.num_layers,
        hidden_size=t.hidden_size,
        ffn_hidden_size=t.ffn_hidden_size,
        num_attention_heads=t.num_heads,
        num_query_groups=t.num_kv_heads,
        kv_channels=t.head_dim,
        add_bias_linear=False,
        add_qkv_bias=t.qkv_bias,
        # finalize_model_grads sums the q/k-norm grads over TP only when this is set and the parameter names
        # hold "q_layernorm" / "k_layernorm" (megatron's slot names, kept by our layer spec)
        qk_layernorm=t.qk_norm,
        gated_linear_unit=True,
        activation_func=F.silu,
        normalization="RMSNorm",
        layernorm_epsilon=t.rms_norm_eps,
        sequence_parallel=layout.sequence_parallel and tp > 1,
        **common,
        **extra,
    )


def build_language_model(t: TextArch, llm_config, *, kernels: str, pre_process: bool, post_process: bool):
    """The megatron ``GPTModel`` of one pipeline stage with our packed-attention / RoPE layer spec."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build

    from mllm_mega.models.common.norm import TorchRMSNorm, TritonRMSNorm
    from mllm_mega.models.common.layer_spec import layer_spec

    norm_cls = TritonRMSNorm if kernels == "triton" else TorchRMSNorm
    block = TransformerBlockSubmodules(
        layer_specs=[layer_spec(causal=True, norm="rmsnorm", kernels=kernels, qk_norm=t.qk_norm)]
        * get_num_layers_to_build(llm_config),
        layer_norm=norm_cls,
    )
    return GPTModel(
        config=llm_config,
        transformer_layer_spec=block,
        vocab_size=t.vocab_size,
        max_sequence_length=t.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=True,
        share_embeddings_and_output_weights=t.tie_word_embeddings,
        position_embedding_type="none",
        scatter_embedding_sequence_parallel=False,
    )


def rope_inv_freq(t: TextArch) -> torch.Tensor:
    d = t.head_dim
    return 1.0 / (t.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float) / d))


# ---- HF key map -----------------------------------------------------------------------------------------
def qkv_to_megatron(q, k, v, num_heads: int, num_kv_heads: int):
    """[q; k; v] (rows per head) -> megatron's grouped layout, for weights (out, in) or biases (out,)."""
    head_dim = q.shape[0] // num_heads
    rest = q.shape[1:]
    per_group = num_heads // num_kv_heads
    q = q.reshape(num_kv_heads, per_group * head_dim, *rest)
    k = k.reshape(num_kv_heads, head_dim, *rest)
    v = v.reshape(num_kv_heads, head_dim, *rest)
    return torch.cat([q, k, v], dim=1).reshape(-1, *rest).contiguous()


def qkv_from_megatron(qkv, num_heads: int, num_kv_heads: int):
    per_group = num_heads // num_kv_heads
    head_dim = qkv.shape[0] // (num_heads + 2 * num_kv_heads)
    rest = qkv.shape[1:]
    g = qkv.reshape(num_kv_heads, (per_group + 2) * head_dim, *rest)
    q, k, v = torch.split(g, [per_group * head_dim, head_dim, head_dim], dim=1)
    return (q.reshape(-1, *rest).contiguous(), k.reshape(-1, *rest).contiguous(),
            v.reshape(-1, *rest).contiguous())


def llm_key_pairs(t: TextArch, *, ours: str = "language_model.", hf: str = "model.",
                  lm_head: str = "lm_head.weight"):
    """(our key, [HF keys], kind) for every LLM parameter; kinds: copy | glu | qkv_split."""
    pairs = [(f"{ours}embedding.word_embeddings.weight", [f"{hf}embed_tokens.weight"], "copy")]
    for i in range(t.num_layers):
        h, o = f"{hf}layers.{i}.", f"{ours}decoder.layers.{i}."
        pairs += [
            (f"{o}input_layernorm.weight", [f"{h}input_layernorm.weight"], "copy"),
            (f"{o}pre_mlp_layernorm.weight", [f"{h}post_attention_layernorm.weight"], "copy"),
            (f"{o}self_attention.linear_qkv.weight", [f"{h}self_attn.{x}_proj.weight" for x in "qkv"], "qkv_split"),
        ]
        if t.qkv_bias:
            pairs.append((f"{o}self_attention.linear_qkv.bias", [f"{h}self_attn.{x}_proj.bias" for x in "qkv"],
                          "qkv_split"))
        if t.qk_norm:
            pairs += [(f"{o}self_attention.q_layernorm.weight", [f"{h}self_attn.q_norm.weight"], "copy"),
                      (f"{o}self_attention.k_layernorm.weight", [f"{h}self_attn.k_norm.weight"], "copy")]
        pairs += [
            (f"{o}self_attention.linear_proj.weight", [f"{h}self_attn.o_proj.weight"], "copy"),
            (f"{o}mlp.linear_fc1.weight", [f"{h}mlp.gate_proj.weight", f"{h}mlp.up_proj.weight"], "glu"),
            (f"{o}mlp.linear_fc2.weight", [f"{h}mlp.down_proj.weight"], "copy"),
        ]
    pairs.append((f"{ours}decoder.final_layernorm.weight", [f"{hf}norm.weight"], "copy"))
    if not t.tie_word_embeddings:
        pairs.append((f"{ours}output_layer.weight", [lm_head], "copy"))
    return pairs


def llm_forward_flops(t: TextArch, segment_lens: list[int], *, causal: bool = True) -> dict[str, float]:
    """{"linear": ..., "attention": ...} forward FLOPs of the LLM on packed samples of these lengths.

    ``causal`` counts the attended (query, key) pairs, n(n+1)/2 per sample; False counts n^2 (what a kernel
    that computes the full score matrix performs). The q/k norms are O(tokens * width) and not counted.
    """
    hd, tokens = t.head_dim, sum(segment_lens)
    per_token = (2 * t.hidden_size * (t.num_heads + 2 * t.num_kv_heads) * hd  # linear_qkv
                 + 2 * t.num_heads * hd * t.hidden_size                      # linear_proj
                 + 2 * 3 * t.hidden_size * t.ffn_hidden_size)                # gated MLP
    pairs = sum(n * (n + 1) // 2 if causal else n * n for n in segment_lens)
    attention = 4 * pairs * t.num_heads * hd  # QK^T and AV
    head = 2 * t.hidden_size * t.vocab_size * tokens
    return {"linear": float(t.num_layers * per_token * tokens + head), "attention": float(t.num_layers * attention)}


class LanguageModelStage:
    """Pipeline plumbing megatron's schedules call on a stage whose LLM is ``self.language_model`` (a GPTModel
    stage): the received activation goes to the LLM; the tied embedding/output weight is the LLM's."""

    def set_input_tensor(self, input_tensor):
        if isinstance(input_tensor, (list, tuple)):
            input_tensor = input_tensor[0]
        self.language_model.set_input_tensor(input_tensor)

    def shared_embedding_or_output_weight(self):
        return self.language_model.shared_embedding_or_output_weight()
