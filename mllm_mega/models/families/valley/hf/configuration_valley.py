"""ValleyConfig: the HF configuration of the Valley2.5 family (Qwen2-VL vision tower + Qwen3 LLM).

This file is copied verbatim into every Valley HF directory and named by ``auto_map["AutoConfig"]``
(``configuration_valley.ValleyConfig``), so it must import nothing but transformers.

Fields (config.json, ``model_type: "valley"``):

* ``vision_config``: a ``Qwen2VLVisionConfig`` (``model_type: qwen2_vl_vision``); its ``hidden_size`` is the
  patch merger's output width and must equal ``text_config.hidden_size``.
* ``text_config``: a ``Qwen3Config`` (``model_type: qwen3``).
* ``image_token_id`` / ``video_token_id``: the placeholder ids (``<|image_pad|>`` / ``<|video_pad|>``) that the
  merged vision features replace one for one; ``vision_start_token_id`` / ``vision_end_token_id``:
  ``<|vision_start|>`` / ``<|vision_end|>``.
* ``position_mode``: ``"mrope"`` (default; Qwen2-VL's 3-D temporal/height/width positions) or ``"1d"``
  (plain 1-D positions, as Valley2's LLM uses).
* ``mrope_section``: how the ``head_dim // 2`` rotary frequencies of the Qwen3 heads are split between the
  temporal, height and width position rows (sums to ``text_config.head_dim // 2``). Default: Qwen2-VL's
  split scaled to the head, ``[h - 2*(3h//8), 3h//8, 3h//8]`` with ``h = head_dim // 2`` (``[16, 24, 24]`` for
  head_dim 128, which is exactly Qwen2-VL's). Ignored in ``"1d"`` mode.
* ``tie_word_embeddings``: lm_head shares ``model.embed_tokens.weight``.
"""
from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers.configuration_utils import PreTrainedConfig, SubConfigSpec
from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLVisionConfig
from transformers.models.qwen3.configuration_qwen3 import Qwen3Config

POSITION_MODES = ("mrope", "1d")


def default_mrope_section(head_dim: int) -> list[int]:
    """Qwen2-VL's [16, 24, 24] (for head_dim 128) scaled to another head_dim."""
    half = head_dim // 2
    hw = half * 3 // 8
    return [half - 2 * hw, hw, hw]


@strict
class ValleyConfig(PreTrainedConfig):
    """Qwen2-VL vision tower (with its 2x2 merger) feeding a Qwen3 decoder; see the module docstring."""

    model_type = "valley"
    sub_configs_defaults = {
        "vision_config": SubConfigSpec(config_class=Qwen2VLVisionConfig),
        "text_config": SubConfigSpec(config_class=Qwen3Config),
    }

    vision_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    position_mode: str = "mrope"
    mrope_section: list[int] | None = None
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.position_mode not in POSITION_MODES:
            raise ValueError(f"ValleyConfig: position_mode {self.position_mode!r} is not one of {POSITION_MODES}")
        head_dim = self.text_config.head_dim
        if self.mrope_section is None:
            self.mrope_section = default_mrope_section(head_dim)
        self.mrope_section = [int(s) for s in self.mrope_section]
        if len(self.mrope_section) != 3 or sum(self.mrope_section) != head_dim // 2:
            raise ValueError(f"ValleyConfig: mrope_section {self.mrope_section} must be 3 numbers summing to "
                             f"text_config.head_dim // 2 = {head_dim // 2}")
        if self.vision_config.hidden_size != self.text_config.hidden_size:
            raise ValueError(f"ValleyConfig: vision_config.hidden_size (merger output) "
                             f"{self.vision_config.hidden_size} != text_config.hidden_size "
                             f"{self.text_config.hidden_size}")
        for key in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"):
            if not 0 <= getattr(self, key) < self.text_config.vocab_size:
                raise ValueError(f"ValleyConfig: {key} {getattr(self, key)} is outside the vocabulary "
                                 f"(text_config.vocab_size {self.text_config.vocab_size})")


__all__ = ["ValleyConfig", "default_mrope_section"]
