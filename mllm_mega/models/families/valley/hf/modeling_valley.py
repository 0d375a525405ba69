"""ValleyForConditionalGeneration: the HF (transformers) model of the Valley2.5 family, remote-code style.

Valley2.5 (ByteDance, "Valley2.5" model card) pairs the Qwen2-VL NaViT vision tower with a Qwen3 LLM; no
transformers class does. This file (copied verbatim into every Valley HF directory with
``configuration_valley.py``; ``auto_map``: ``AutoModelForImageTextToText`` and ``AutoModelForCausalLM`` ->
``modeling_valley.ValleyForConditionalGeneration``, ``AutoConfig`` -> ``configuration_valley.ValleyConfig``)
builds the model only from transformers' own classes:

* ``visual``: ``Qwen2VisionTransformerPretrainedModel`` (patch embedding, NaViT blocks with 2-D RoPE, and its
  2x2 ``PatchMerger`` ``ln_q -> mlp.0 -> GELU -> mlp.2``), its merged output scattered one for one onto the
  ``<|image_pad|>`` / ``<|video_pad|>`` placeholder embeddings (images first, then videos, in order);
* ``model``: ``Qwen3Model`` (embeddings, decoder with q/k RMSNorm, final norm); ``lm_head``: ``nn.Linear``
  (tied to ``model.embed_tokens`` when ``tie_word_embeddings``).

In-memory names equal the on-disk names, which are Qwen2-VL's hub layout for the vision part and Qwen3's for
the LLM: ``visual.patch_embed.proj.weight``, ``visual.blocks.N.{norm1,norm2}.{weight,bias}``,
``visual.blocks.N.attn.{qkv,proj}.{weight,bias}``, ``visual.blocks.N.mlp.{fc1,fc2}.{weight,bias}``,
``visual.merger.ln_q.{weight,bias}``, ``visual.merger.mlp.{0,2}.{weight,bias}``, ``model.embed_tokens.weight``,
``model.layers.N.input_layernorm.weight``, ``model.layers.N.self_attn.{q,k,v,o}_proj.weight``,
``model.layers.N.self_attn.{q,k}_norm.weight``, ``model.layers.N.post_attention_layernorm.weight``,
``model.layers.N.mlp.{gate,up,down}_proj.weight``, ``model.norm.weight``, ``lm_head.weight`` (absent when tied).

Positions (``config.position_mode``):

* ``"mrope"`` (default): Qwen2-VL's multimodal RoPE on the Qwen3 decoder. Position ids are (3, B, T) rows
  (temporal, height, width) from transformers' own ``Qwen2VLModel.get_rope_index`` rule: text tokens advance
  all rows by one, an image/video grid of (t, h/2, w/2) merged tokens gets offset (t, h, w) coordinates, the
  text after it continues at max + 1; video frames advance the temporal row by 1 per merged frame (Qwen2-VL,
  no absolute time). ``mm_token_type_ids`` is derived from ``input_ids`` when not passed. Qwen3's rotary is
  swapped for transformers' ``Qwen2VLRotaryEmbedding`` built on the Qwen3 head_dim and rope_theta with
  ``config.mrope_section``: the ``head_dim // 2`` frequencies are split into [temporal, height, width]
  chunks, each taken from its row (the same frequencies in both halves, as ``rotate_half`` RoPE needs), and
  the resulting (B, T, head_dim) cos/sin go into Qwen3's unchanged ``apply_rotary_pos_emb`` after q/k norm.
  On text-only input all three rows are equal, so this is exactly Qwen3's 1-D RoPE. The causal mask is
  built here from ``attention_mask`` (never inferred from the 3-row positions).
  MRoPE is the default because the issue asks for it (Qwen2-VL's own LLM uses it with this ViT); Valley2's
  code used 1-D positions in its LLM, hence the option below. The released Valley2.5 remote
  code could not be read offline, so which of the two it trained with is not checked here.
* ``"1d"``: Qwen3 unchanged; positions ``attention_mask.cumsum(-1) - 1`` (0 on padding) or ``arange`` after
  the cached length; images only replace placeholder embeddings.

``generate()``: ``pixel_values`` / ``pixel_values_videos`` reach only the prefill step (transformers drops them
after it); positions of the prompt come from :meth:`_prepare_position_ids_for_generation` and grow by one per
new token. Checked with eager attention on CPU (fp32); the 3-row positions are not meant for
flash-attention's position-based packing.
"""
from __future__ import annotations

import copy

import torch
from torch import nn
from transformers.generation import GenerationMixin
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.modeling_utils import PreTrainedModel, slice_logits_to_keep
from transformers.models.qwen2_vl.modeling_qwen2_vl import (
    Qwen2VisionTransformerPretrainedModel, Qwen2VLModel, Qwen2VLRotaryEmbedding,
)
from transformers.models.qwen3.modeling_qwen3 import Qwen3Model

from .configuration_valley import ValleyConfig

TEXT, IMAGE, VIDEO = 0, 1, 2


def mrope_text_config(config: ValleyConfig):
    """The Qwen3 text config with ``mrope_section`` in its rope parameters (what Qwen2VLRotaryEmbedding reads)."""
    text = copy.deepcopy(config.text_config)
    text.rope_parameters = {**text.rope_parameters, "mrope_section": list(config.mrope_section)}
    return text


class ValleyPreTrainedModel(PreTrainedModel):
    config: ValleyConfig
    config_class = ValleyConfig
    base_model_prefix = "model"
    input_modalities = ("image", "video", "text")
    supports_gradient_checkpointing = True
    _no_split_modules = ["Qwen2VLVisionBlock", "Qwen3DecoderLayer"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_attention_backend = True


class ValleyForConditionalGeneration(ValleyPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    # transformers' rule for Qwen2-VL's 3-D positions, used unchanged (it reads config.vision_config and
    # calls self.get_vision_position_ids).
    get_rope_index = Qwen2VLModel.get_rope_index
    get_vision_position_ids = Qwen2VLModel.get_vision_position_ids

    def __init__(self, config: ValleyConfig):
        super().__init__(config)
        self.visual = Qwen2VisionTransformerPretrainedModel._from_config(config.vision_config)
        self.model = Qwen3Model._from_config(config.text_config)
        if config.position_mode == "mrope":
            self.model.rotary_emb = Qwen2VLRotaryEmbedding(config=mrope_text_config(config))
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.rope_deltas = None  # (B, 1): MRoPE position minus token index after the prompt, for cached decoding
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    # ---- vision -------------------------------------------------------------------------------------------
    def get_image_features(self, pixel_values: torch.Tensor, image_grid_thw: torch.LongTensor) -> torch.Tensor:
        """Merged vision features, (sum_i t_i*h_i*w_i/4, text hidden size)."""
        pixel_values = pixel_values.type(self.visual.dtype)
        return self.visual(pixel_values, grid_thw=image_grid_thw).pooler_output

    def _scatter(self, input_ids, inputs_embeds, features, token_id, what):
        if input_ids is None:
            raise ValueError(f"Valley: {what} inputs need input_ids (to find the placeholder tokens)")
        mask = input_ids == token_id
        if int(mask.sum()) != features.shape[0]:
            raise ValueError(f"Valley: {int(mask.sum())} {what} placeholder tokens (id {token_id}) but "
                             f"{features.shape[0]} {what} features from the grids")
        mask = mask.unsqueeze(-1).expand_as(inputs_embeds)
        return inputs_embeds.masked_scatter(mask, features.to(inputs_embeds.device, inputs_embeds.dtype))

    # ---- positions ----------------------------------------------------------------------------------------
    def token_types(self, input_ids: torch.Tensor) -> torch.Tensor:
        types = torch.zeros_like(input_ids, dtype=torch.int32)
        types[input_ids == self.config.image_token_id] = IMAGE
        types[input_ids == self.config.video_token_id] = VIDEO
        return types

    @staticmethod
    def _text_positions(attention_mask, batch, seq_len, past, device):
        if attention_mask is not None and attention_mask.ndim == 2:
            pos = attention_mask.long().cumsum(-1) - 1
            return pos.masked_fill(attention_mask == 0, 0)[:, -seq_len:].to(device)
        return (torch.arange(seq_len, device=device) + past).unsqueeze(0).expand(batch, -1)

    def compute_position_ids(self, input_ids, inputs_embeds, attention_mask=None, image_grid_thw=None,
                             video_grid_thw=None, mm_token_type_ids=None, past=0):
        """(B, T) positions in ``1d`` mode, (3, B, T) in ``mrope`` mode (see the module docstring)."""
        batch, seq_len = inputs_embeds.shape[:2]
        text = self._text_positions(attention_mask, batch, seq_len, past, inputs_embeds.device)
        if self.config.position_mode == "1d":
            return text
        if past == 0 and input_ids is not None:
            if mm_token_type_ids is None:
                mm_token_type_ids = self.token_types(input_ids)
            pos, self.rope_deltas = self.get_rope_index(
                input_ids, mm_token_type_ids, image_grid_thw=image_grid_thw, video_grid_thw=video_grid_thw,
                attention_mask=attention_mask)
            return pos
        deltas = self.rope_deltas if self.rope_deltas is not None else torch.zeros(batch, 1, dtype=torch.long)
        deltas = deltas.repeat_interleave(batch // deltas.shape[0], dim=0).to(text.device)
        return (text + deltas).unsqueeze(0).expand(3, -1, -1)

    def _prepare_position_ids_for_generation(self, inputs_tensor, model_kwargs):
        text = super()._prepare_position_ids_for_generation(inputs_tensor, model_kwargs)
        if self.config.position_mode == "1d":
            return text
        input_ids = model_kwargs.get("input_ids", inputs_tensor)
        cache = model_kwargs.get("cache")
        past = cache.get_seq_length() if cache is not None else 0
        if past or not (input_ids.ndim == 2 and not input_ids.is_floating_point()):
            deltas = self.rope_deltas if (past and self.rope_deltas is not None) else torch.zeros_like(text[:, :1])
            return (text + deltas.to(text.device)).unsqueeze(0).expand(3, -1, -1)
        types = model_kwargs.get("mm_token_type_ids")
        pos, self.rope_deltas = self.get_rope_index(
            input_ids, types if types is not None else self.token_types(input_ids),
            image_grid_thw=model_kwargs.get("image_grid_thw"), video_grid_thw=model_kwargs.get("video_grid_thw"),
            attention_mask=model_kwargs.get("attention_mask"))
        return pos

    # ---- forward ------------------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache=None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        pixel_values: torch.Tensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        image_grid_thw: torch.LongTensor | None = None,
        video_grid_thw: torch.LongTensor | None = None,
        mm_token_type_ids: torch.IntTensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Valley: pass exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.model.embed_tokens(input_ids)
        if pixel_values is not None:
            if image_grid_thw is None:
                raise ValueError("Valley: pixel_values given without image_grid_thw")
            feats = self.get_image_features(pixel_values, image_grid_thw)
            inputs_embeds = self._scatter(input_ids, inputs_embeds, feats, self.config.image_token_id, "image")
        if pixel_values_videos is not None:
            if video_grid_thw is None:
                raise ValueError("Valley: pixel_values_videos given without video_grid_thw")
            feats = self.get_image_features(pixel_values_videos, video_grid_thw)
            inputs_embeds = self._scatter(input_ids, inputs_embeds, feats, self.config.video_token_id, "video")

        past = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            position_ids = self.compute_position_ids(input_ids, inputs_embeds, attention_mask, image_grid_thw,
                                                     video_grid_thw, mm_token_type_ids, past)
        if position_ids.ndim == 3 and not isinstance(attention_mask, dict):
            if use_cache and cache is None:
                from transformers.cache_utils import DynamicCache

                cache = DynamicCache(config=self.config.text_config)
            mask_kwargs = {"config": self.config.text_config, "inputs_embeds": inputs_embeds,
                           "attention_mask": attention_mask, "cache": cache, "position_ids": None}
            masks = {"full_attention": create_causal_mask(**mask_kwargs)}
            if "sliding_attention" in self.config.text_config.layer_types:
                masks["sliding_attention"] = create_sliding_window_causal_mask(**mask_kwargs)
            attention_mask = masks
        outputs = self.model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
                             cache=cache, use_cache=use_cache, **kwargs)
        hidden_states = slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep)
        logits = self.lm_head(hidden_states)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.text_config.vocab_size,
                                      **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=outputs.cache,
                                      hidden_states=outputs.hidden_states, attentions=outputs.attentions)


__all__ = ["ValleyForConditionalGeneration", "ValleyPreTrainedModel"]
