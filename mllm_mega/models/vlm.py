"""The generic vision-language model on megatron-core, written once: vision encoder -> projector on the first
pipeline stage, the LLM (megatron ``GPTModel`` with our packed-attention/MRoPE layer spec) across all stages,
the embedding scatter of the vision features at the placeholder tokens and the pipeline plumbing.

The encoder and the projector are parts, built from the arch by factory functions a family passes to
:func:`build_stage` (Qwen2-VL / Qwen2.5-VL: :func:`mllm_mega.models.encoders.qwen2_vit.build_encoder` and
:func:`mllm_mega.models.projectors.patch_merger.build_projector`), so another encoder or projector plugs in
without editing this file. An encoder factory is ``(arch, vision_config, make_projector, *, kernels)`` and
returns a module ``(pixel_values, grid_thw) -> (num_merged_tokens, llm_hidden)`` holding the projector that
``make_projector()`` builds; a projector factory is ``(arch, vision_config, *, kernels)``. The arch supplies
``vision.spatial_merge_size`` (placeholders per ``grid_thw`` row: ``t*h*w / merge**2``) or
``vision.tokens_per_grid(grid_thw)`` (its own count, e.g. a fixed pool; :func:`media_token_counts`),
``image_token_id``/``video_token_id`` and ``text`` (the LLM arch).

The forward works on one packed (THD) sequence: ``input_ids`` (T,), MRoPE ``position_ids`` (3, T) restarting
per packed sample, ``cu_seqlens`` bounding the samples (causal attention never crosses them), plus the
vision inputs of the whole pack. :func:`pack_hf_batch` turns a padded batch of HF processor inputs into that
form, so the model accepts exactly what the HF processor returns.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.transformer.module import MegatronModule

from mllm_mega.models.common.attention import make_packed_seq_params
from mllm_mega.models.llms.qwen import LanguageModelStage, build_language_model, rope_inv_freq
from mllm_mega.models.layout import ParallelLayout
from mllm_mega.models.positions import get_rope_index
from mllm_mega.models.common.layer_spec import resolve_kernels


def media_token_counts(arch, grid_thw: torch.Tensor) -> torch.Tensor:
    """(num_grids,) placeholder tokens of each ``grid_thw`` row: the vision arch's own rule where it has one
    (``vision.tokens_per_grid``, e.g. a fixed k x k pool), else ``t*h*w / spatial_merge_size**2`` (Qwen2-VL)."""
    rule = getattr(arch.vision, "tokens_per_grid", None)
    if rule is not None:
        return rule(grid_thw)
    return grid_thw.prod(-1) // arch.vision.spatial_merge_size ** 2


class VisionLanguageModel(LanguageModelStage, MegatronModule):
    """One pipeline stage of the model (the whole model when PP=1); ``make_encoder``/``make_projector``: the
    part factories (see the module docstring), used on the first stage only."""

    def __init__(self, arch, vision_config, llm_config, *, make_encoder, make_projector, kernels: str = "torch",
                 pre_process: bool = True, post_process: bool = True):
        super().__init__(config=llm_config)
        from megatron.core.enums import ModelType

        self.model_type = ModelType.encoder_or_decoder  # read by megatron's pipeline schedules
        self.arch = arch
        self.pre_process, self.post_process = pre_process, post_process
        kernels = resolve_kernels(kernels)
        self.kernels = kernels
        self.vision = None
        if pre_process:
            self.vision = make_encoder(arch, vision_config,
                                       lambda: make_projector(arch, vision_config, kernels=kernels), kernels=kernels)
        self.language_model = build_language_model(arch.text, llm_config, kernels=kernels,
                                                   pre_process=pre_process, post_process=post_process)
        self.register_buffer("rope_inv_freq", rope_inv_freq(arch.text), persistent=False)
        self.share_embeddings_and_output_weights = arch.text.tie_word_embeddings

    # --- forward -----------------------------------------------------------------------------------
    def embed(self, input_ids, pixel_values=None, image_grid_thw=None, pixel_values_videos=None,
              video_grid_thw=None, context_parallel=None, image_feature_index=None, video_feature_index=None):
        """Token embeddings with vision features written at the image/video placeholders: (T, 1, hidden).

        ``image_feature_index`` / ``video_feature_index`` (preference packs, data/preference.py): for each image
        (video) placeholder in order, its row of the image (video) features, so media shared by several
        segments go through the ViT once; None = placeholders take the feature rows in order."""
        emb = self.language_model.embedding(input_ids=input_ids.view(1, -1), position_ids=None)  # (T, 1, h)
        pieces, grids = [], []
        for pv, grid in ((pixel_values, image_grid_thw), (pixel_values_videos, video_grid_thw)):
            if pv is not None and grid is not None and grid.numel() > 0:
                pieces.append(pv)
                grids.append(grid)
        if context_parallel is not None:  # context parallel: media split over CP ranks, features all-gathered
            if image_feature_index is not None or video_feature_index is not None:
                raise ValueError("image_feature_index/video_feature_index (shared media) are not supported under "
                                 "context parallelism")
            from mllm_mega.models.common.context_parallel import cp_embed

            return cp_embed(self, input_ids, context_parallel, pieces, grids, emb)
        if pieces:
            feats = self.vision(torch.cat(pieces), torch.cat(grids))
            num_image = int(media_token_counts(self.arch, image_grid_thw).sum()) if image_grid_thw is not None else 0
            emb = emb.clone()
            for token_id, part, index in ((self.arch.image_token_id, feats[:num_image], image_feature_index),
                                          (self.arch.video_token_id, feats[num_image:], video_feature_index)):
                if index is not None:
                    part = part[index]  # a row used by several placeholders: its gradients add up
                mask = input_ids == token_id
                if int(mask.sum()) != part.shape[0]:
                    kind = "image" if token_id == self.arch.image_token_id else "video"
                    raise ValueError(
                        f"{int(mask.sum())} {kind} placeholder tokens in input_ids but the {kind} grids give "
                        f"{part.shape[0]} merged tokens"
                    )
                emb[mask, 0] = part.to(emb.dtype)
        return emb

    def forward(self, input_ids, position_ids, cu_seqlens, max_seqlen=None, pixel_values=None,
                image_grid_thw=None, pixel_values_videos=None, video_grid_thw=None, context_parallel=None,
                image_feature_index=None, video_feature_index=None):
        """One packed sequence. Returns (T, vocab/TP) logits on the last stage, hidden states elsewhere.

        ``context_parallel``: this rank's CPShard; the token inputs are then its local slice.
        ``*_feature_index``: see :meth:`embed`."""
        if max_seqlen is None:
            max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
        params = make_packed_seq_params(cu_seqlens, max_seqlen, position_ids, self.rope_inv_freq,
                                        self.arch.text.mrope_section, context_parallel=context_parallel)
        decoder_input = None
        if self.pre_process:
            decoder_input = self.embed(input_ids, pixel_values, image_grid_thw, pixel_values_videos,
                                       video_grid_thw, context_parallel=context_parallel,
                                       image_feature_index=image_feature_index,
                                       video_feature_index=video_feature_index)
            if self.config.sequence_parallel:
                decoder_input = tensor_parallel.scatter_to_sequence_parallel_region(decoder_input)
        out = self.language_model(input_ids=None, position_ids=None, attention_mask=None,
                                  decoder_input=decoder_input, packed_seq_params=params)
        if self.post_process:
            return out[0]  # (b=1, T, V/TP) -> (T, V/TP)
        return out


def build_stage(arch, layout: ParallelLayout | None = None, *, to_configs, make_encoder, make_projector,
                kernels: str = "torch", params_dtype=torch.float32, recompute_vision=None,
                recompute_llm=None) -> VisionLanguageModel:
    """Build this rank's stage of the model (megatron's parallel_state must be initialised).

    ``to_configs``: the family's ``(arch, layout, *, params_dtype, use_cpu_initialization, recompute_vision,
    recompute_llm) -> (vision TransformerConfig, LLM TransformerConfig)``. ``params_dtype`` bf16 gives a model
    whose every parameter is bf16 (fp32 master weights are the optimizer's); ``recompute_*`` set activation
    recomputation per tower (see ``Recompute``)."""
    layout = layout or ParallelLayout(
        tensor_model_parallel_size=parallel_state.get_tensor_model_parallel_world_size(),
        pipeline_model_parallel_size=parallel_state.get_pipeline_model_parallel_world_size(),
    )
    vision_cfg, llm_cfg = to_configs(arch, layout, params_dtype=params_dtype,
                                                 use_cpu_initialization=not torch.cuda.is_available(),
                                                 recompute_vision=recompute_vision, recompute_llm=recompute_llm)
    pre = parallel_state.is_pipeline_first_stage(ignore_virtual=True)
    post = parallel_state.is_pipeline_last_stage(ignore_virtual=True)
    model = VisionLanguageModel(arch, vision_cfg, llm_cfg, make_encoder=make_encoder, make_projector=make_projector,
                                kernels=kernels, pre_process=pre, post_process=post)
    if torch.cuda.is_available():
        model.cuda(torch.cuda.current_device())
    return model


def pack_hf_batch(arch, input_ids, attention_mask=None, image_grid_thw=None, video_grid_thw=None,
                  second_per_grid_ts=None, pad_to_multiple: int = 1):
    """Pack a padded HF batch (B, S) into one THD sequence.

    Returns ``(packed_ids (T,), position_ids (3, T), cu_seqlens (B+1 or B+2,), token_index)`` where
    ``token_index`` (T_real,) gives, for each real packed token, its flat index in the (B, S) batch. A trailing
    padding segment is appended when ``T`` must be a multiple of ``pad_to_multiple`` (sequence parallel).
    """
    batch, seq = input_ids.shape
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    pos = get_rope_index(
        input_ids, image_token_id=arch.image_token_id, video_token_id=arch.video_token_id,
        image_grid_thw=image_grid_thw, video_grid_thw=video_grid_thw, second_per_grid_ts=second_per_grid_ts,
        attention_mask=attention_mask, spatial_merge_size=arch.vision.spatial_merge_size,
        tokens_per_second=arch.vision.tokens_per_second,  # None: Qwen2-VL (interval 1)
    )
    keep = attention_mask.bool()
    token_index = torch.nonzero(keep.reshape(-1)).squeeze(1)
    packed_ids = input_ids.reshape(-1)[token_index]
    packed_pos = pos.reshape(3, -1)[:, token_index]
    lens = keep.sum(1).tolist()
    bounds = [0]
    for n in lens:
        bounds.append(bounds[-1] + n)
    pad = (-bounds[-1]) % pad_to_multiple
    if pad:
        packed_ids = F.pad(packed_ids, (0, pad))
        packed_pos = F.pad(packed_pos, (0, pad))
        bounds.append(bounds[-1] + pad)
    return packed_ids, packed_pos, torch.tensor(bounds, dtype=torch.int32), token_index
