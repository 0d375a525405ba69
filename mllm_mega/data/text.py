"""Tokenization of captions and LLaVA-style conversations with the tokenizer directory's chat template.

Each conversation is rendered with the tokenizer's own chat template (``apply_chat_template``), one turn at
a time: the text an assistant turn adds, up to and including the end-of-turn token, is supervised; system
and user turns and the ``<|im_start|>assistant\\n`` header are not. Pieces are tokenized separately, which is
also how generation sees them (the prompt ends at the header). ``<image>`` / ``<video>`` placeholders become
``<|vision_start|><|image_pad|><|vision_end|>`` (``<|video_pad|>``) and each pad is later expanded to the
medium's merged-token count, t*h*w/4, as the HF Qwen2-VL processor does. A caption sample is its vision
blocks followed by the caption and ``<|endoftext|>``, supervised on the caption and the end token.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mllm_mega.data.vision import BadSample

IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER = "<image>", "<video>"
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
TEXT, IMAGE, VIDEO = 0, 1, 2  # token types, as mllm_mega.models.positions


@dataclass
class Encoded:
    """Token ids of one sample before placeholder expansion (one pad token per image/video)."""

    ids: list[int]
    supervised: list[bool]  # is this token a training target


class TextProcessor:
    """Tokenizer + chat template of a Hugging Face tokenizer directory, with Qwen2-VL's special tokens."""

    def __init__(self, tokenizer_dir: str):
        from transformers import AutoTokenizer

        try:
            self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        except Exception as exc:
            raise ValueError(f"cannot load a tokenizer from tokenizer_dir={tokenizer_dir!r}: {exc}") from exc
        if not self.tokenizer.chat_template:
            raise ValueError(f"the tokenizer in {tokenizer_dir!r} has no chat_template")
        ids = {}
        for name in ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>", "<|im_end|>",
                     "<|endoftext|>"):
            token_id = self.tokenizer.convert_tokens_to_ids(name)
            if token_id is None or token_id == self.tokenizer.unk_token_id:
                raise ValueError(f"the tokenizer in {tokenizer_dir!r} lacks the special token {name}")
            ids[name] = int(token_id)
        self.vision_start_id, self.vision_end_id = ids["<|vision_start|>"], ids["<|vision_end|>"]
        self.image_token_id, self.video_token_id = ids["<|image_pad|>"], ids["<|video_pad|>"]
        self.end_of_turn_id, self.end_of_text_id = ids["<|im_end|>"], ids["<|endoftext|>"]
        self.pad_token_id = self.end_of_text_id
        self.vocab_size = len(self.tokenizer)

    def _tokenize(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

    def vision_block(self, kind: str) -> str:
        pad = "<|image_pad|>" if kind == "image" else "<|video_pad|>"
        return f"<|vision_start|>{pad}<|vision_end|>"

    def _render(self, messages, add_generation_prompt=False) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    def encode_conversation(self, messages: list[dict]) -> Encoded:
        """``messages``: [{"role": user|assistant|system, "content": str}] with vision blocks already in."""
        ids: list[int] = []
        supervised: list[bool] = []
        rendered = ""
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prompt = self._render(messages[:i], add_generation_prompt=True)
            full = self._render(messages[: i + 1])
            if not prompt.startswith(rendered) or not full.startswith(prompt):
                raise ValueError("the chat template does not render conversations prefix by prefix")
            answer = full[len(prompt):]
            # supervise through the end-of-turn token, not the separator the template puts after it
            end = answer.rfind("<|im_end|>")
            cut = end + len("<|im_end|>") if end >= 0 else len(answer)
            for text, sup in ((prompt[len(rendered):], False), (answer[:cut], True), (answer[cut:], False)):
                piece = self._tokenize(text)
                ids += piece
                supervised += [sup] * len(piece)
            rendered = full
        tail = self._tokenize(self._render(messages)[len(rendered):])
        return Encoded(ids + tail, supervised + [False] * len(tail))

    def encode_caption(self, kinds: list[str], caption: str) -> Encoded:
        """Vision blocks of ``kinds`` ("image"/"video") then the caption and <|endoftext|> (supervised)."""
        prompt = self._tokenize("".join(self.vision_block(k) for k in kinds))
        text = self._tokenize(caption) + [self.end_of_text_id]
        return Encoded(prompt + text, [False] * len(prompt) + [True] * len(text))

    def caption_prompt(self, kinds: list[str]) -> list[int]:
        """The prompt that :meth:`encode_caption` trains captions after (for generation at evaluation)."""
        return self._tokenize("".join(self.vision_block(k) for k in kinds))

    def expand(self, enc: Encoded, media_tokens: list[tuple[int, int]]):
        """Expand each pad token to its medium's token count.

        ``media_tokens``: (kind, count) per medium in order of appearance, kind IMAGE or VIDEO.
        Returns (ids int64, supervised bool, token types int32) numpy arrays.
        """
        ids = np.asarray(enc.ids, dtype=np.int64)
        sup = np.asarray(enc.supervised, dtype=bool)
        types = np.zeros(len(ids), dtype=np.int32)
        types[ids == self.image_token_id] = IMAGE
        types[ids == self.video_token_id] = VIDEO
        pad_positions = np.flatnonzero(types != TEXT)
        if len(pad_positions) != len(media_tokens):
            raise BadSample("placeholder_mismatch",
                            f"{len(pad_positions)} vision pad tokens for {len(media_tokens)} media")
        repeats = np.ones(len(ids), dtype=np.int64)
        for pos, (kind, count) in zip(pad_positions, media_tokens):
            if types[pos] != kind:
                raise BadSample("placeholder_mismatch", "image/video placeholders out of order with the media")
            repeats[pos] = count
        return np.repeat(ids, repeats), np.repeat(sup, repeats), np.repeat(types, repeats)


def conversation_messages(obj) -> list[dict]:
    """LLaVA ``{"conversations": [{"from", "value"}]}`` or ``{"messages": [{"role", "content"}]}`` -> messages.

    Raises BadSample("json_malformed") for anything else (no list, unknown role, non-string text, no
    assistant turn).
    """
    if not isinstance(obj, dict):
        raise BadSample("json_malformed", "sample json is not an object")
    turns = obj.get("conversations", obj.get("messages"))
    if not isinstance(turns, list) or not turns:
        raise BadSample("json_malformed", "sample json has no 'conversations' (or 'messages') list")
    messages = []
    for turn in turns:
        if not isinstance(turn, dict):
            raise BadSample("json_malformed", "a conversation turn is not an object")
        role = turn.get("from", turn.get("role"))
        content = turn.get("value", turn.get("content"))
        if role not in ROLES or not isinstance(content, str):
            raise BadSample("json_malformed", f"bad turn (role {role!r}, content type {type(content).__name__})")
        messages.append({"role": ROLES[role], "content": content})
    if not any(m["role"] == "assistant" for m in messages):
        raise BadSample("json_malformed", "conversation has no assistant turn")
    return messages


def insert_vision_blocks(messages: list[dict], num_images: int, num_videos: int, proc: TextProcessor):
    """Replace <image>/<video> placeholders by vision blocks; with no placeholder at all, the media go in
    front of the first user turn (LLaVA convention). Placeholder counts must match the media."""
    text = "".join(m["content"] for m in messages)
    n_img, n_vid = text.count(IMAGE_PLACEHOLDER), text.count(VIDEO_PLACEHOLDER)
    if n_img == 0 and n_vid == 0 and (num_images or num_videos):
        first_user = next((m for m in messages if m["role"] == "user"), None)
        if first_user is None:
            raise BadSample("json_malformed", "media but no user turn to attach them to")
        first_user["content"] = (IMAGE_PLACEHOLDER + "\n") * num_images + (VIDEO_PLACEHOLDER + "\n") * num_videos \
            + first_user["content"]
        n_img, n_vid = num_images, num_videos
    if n_img > num_images or n_vid > num_videos:
        raise BadSample("missing_image", f"{n_img} <image> / {n_vid} <video> placeholders for "
                                         f"{num_images} images / {num_videos} videos")
    if n_img < num_images or n_vid < num_videos:
        raise BadSample("unused_image", f"{num_images} images / {num_videos} videos for {n_img} <image> / "
                                        f"{n_vid} <video> placeholders")
    for m in messages:
        m["content"] = m["content"].replace(IMAGE_PLACEHOLDER, proc.vision_block("image")).replace(
            VIDEO_PLACEHOLDER, proc.vision_block("video"))
    return messages
