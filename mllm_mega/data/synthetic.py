"""Synthetic "shapes" dataset and tokenizer: the embedded default data for tiny CPU runs and for tests.

Each image shows 1-4 shapes of one kind (circle, square, triangle, diamond) and one colour, placed in one
region (left, right, top, bottom, center) of a small noisy background; its caption says exactly that
("two red circles on the left"), and question-answer conversations ask for the count, colour, kind or
place, so a tiny model can learn the mapping. Some samples hold two images (which has more shapes?) and,
on request, short videos of one moving shape given as a sequence of JPEG frames (with ``preference``: pairs
"a red circle moving up" vs another direction). With ``preference`` the
training samples are preference pairs instead (data/preference.py): "Describe the image." with the true
caption as chosen and, as rejected, the caption with one attribute (colour, count, shape or position)
changed (``pair_attributes`` limits which: colour alone is what a tiny model learns to see first), so only a
model that looks at the image can tell them apart. Samples are WebDataset
shards; a byte-level BPE tokenizer with Qwen2-VL's special tokens and a ChatML chat template is trained on
the dataset's text and saved as a Hugging Face tokenizer directory.

Everything is a pure function of (seed, sample index), so the same seed gives byte-identical shards.
"""
from __future__ import annotations

import dataclasses
import io
import json
import os
import sys
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from mllm_mega.data.shards import write_shard

KINDS = ("circle", "square", "triangle", "diamond")
COLOURS = {
    "red": (220, 40, 40), "green": (40, 190, 60), "blue": (50, 90, 230), "yellow": (235, 220, 50),
    "purple": (160, 60, 200), "orange": (245, 140, 30), "white": (240, 240, 240),
}
# region name -> (x0, y0, x1, y1) as fractions of the image, and the caption phrase
REGIONS = {
    "left": ((0.0, 0.0, 0.5, 1.0), "on the left"),
    "right": ((0.5, 0.0, 1.0, 1.0), "on the right"),
    "top": ((0.0, 0.0, 1.0, 0.5), "at the top"),
    "bottom": ((0.0, 0.5, 1.0, 1.0), "at the bottom"),
    "center": ((0.25, 0.25, 0.75, 0.75), "in the center"),
}
COUNT_WORDS = ("zero", "one", "two", "three", "four")
DIRECTIONS = {"right": (1, 0), "left": (-1, 0), "down": (0, 1), "up": (0, -1)}
SYSTEM_PROMPT = "You are a helpful assistant."
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>")
# ChatML as Qwen2-VL uses it: a default system turn, image/video content parts rendered as vision blocks.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\n" + SYSTEM_PROMPT + "<|im_end|>\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{% elif part['type'] == 'video' %}{{ '<|vision_start|><|video_pad|><|vision_end|>' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@dataclass(frozen=True)
class Scene:
    """What one synthetic image shows."""

    kind: str
    colour: str
    count: int
    region: str

    def caption(self) -> str:
        noun = self.kind + ("s" if self.count > 1 else "")
        return f"{COUNT_WORDS[self.count]} {self.colour} {noun} {REGIONS[self.region][1]}"


def random_scene(rng: np.random.Generator) -> Scene:
    return Scene(KINDS[rng.integers(len(KINDS))], list(COLOURS)[rng.integers(len(COLOURS))],
                 int(rng.integers(1, 5)), list(REGIONS)[rng.integers(len(REGIONS))])


def _draw_shape(draw: ImageDraw.ImageDraw, kind: str, cx: float, cy: float, r: float, colour):
    if kind == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
    elif kind == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=colour)
    elif kind == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
    else:
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=colour)


def _background(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    base = rng.integers(30, 90)
    noise = rng.integers(-12, 13, size=(height, width, 3))
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))


def render_scene(scene: Scene, width: int, height: int, rng: np.random.Generator) -> Image.Image:
    """Draw ``scene``: shapes of radius ~15% of the short side, placed without overlap where possible."""
    img = _background(rng, width, height)
    draw = ImageDraw.Draw(img)
    (x0, y0, x1, y1), _ = REGIONS[scene.region]
    r = max(3.0, min(width, height) * rng.uniform(0.09, 0.13))
    placed: list[tuple[float, float]] = []
    for _ in range(scene.count):
        for _attempt in range(50):
            cx = rng.uniform(x0 * width + r, max(x0 * width + r, x1 * width - r))
            cy = rng.uniform(y0 * height + r, max(y0 * height + r, y1 * height - r))
            if all((cx - px) ** 2 + (cy - py) ** 2 >= (2.1 * r) ** 2 for px, py in placed):
                break
        placed.append((cx, cy))
        _draw_shape(draw, scene.kind, cx, cy, r, COLOURS[scene.colour])
    return img


def encode_jpeg(img: Image.Image, quality: int = 92) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _image_size(rng: np.random.Generator, size_range: tuple[int, int]) -> tuple[int, int]:
    low, high = size_range
    return int(rng.integers(low, high + 1)), int(rng.integers(low, high + 1))


def _questions(scene: Scene) -> list[tuple[str, str]]:
    noun = scene.kind + ("s" if scene.count > 1 else "")
    return [
        ("How many shapes are there?", COUNT_WORDS[scene.count]),
        ("What colour are the shapes?", scene.colour),
        ("What kind of shapes are they?", noun),
        ("Where are the shapes?", REGIONS[scene.region][1]),
        ("Describe the image.", scene.caption()),
    ]


ATTRIBUTES = ("colour", "count", "kind", "region")  # what a rejected caption changes


def check_pair_attributes(attributes) -> tuple[str, ...]:
    """``attributes`` as a tuple, each one of ATTRIBUTES (ValueError naming the bad one otherwise)."""
    attributes = tuple(attributes)
    bad = [a for a in attributes if a not in ATTRIBUTES]
    if bad or not attributes:
        raise ValueError(f"pair attributes must be a non-empty subset of {', '.join(ATTRIBUTES)}; got "
                         f"{', '.join(map(repr, bad)) if bad else 'none'}")
    return attributes


def changed_scene(scene: Scene, rng: np.random.Generator,
                  attributes: tuple[str, ...] = ATTRIBUTES) -> tuple[Scene, str]:
    """``scene`` with one of ``attributes`` (colour, count, kind or region) set to another value, and its name."""
    attribute = attributes[rng.integers(len(attributes))]
    values = {"colour": list(COLOURS), "count": [1, 2, 3, 4], "kind": list(KINDS),
              "region": list(REGIONS)}[attribute]
    others = [v for v in values if v != getattr(scene, attribute)]
    return dataclasses.replace(scene, **{attribute: others[rng.integers(len(others))]}), attribute


def make_sample(index: int, seed: int, *, size_range=(56, 112), multi_image_frac=0.1, video_frac=0.0,
                caption_frac=0.5, split: str = "train", preference: bool = False,
                pair_attributes: tuple[str, ...] = ATTRIBUTES) -> tuple[str, dict[str, bytes]]:
    """The ``index``-th sample of the dataset for ``seed`` as (key, {field: bytes}); with ``preference`` the
    training samples are preference pairs whose rejected caption changes one of ``pair_attributes``, or with
    ``video_frac`` video pairs whose rejected caption names another direction (the held-out split stays
    captions)."""
    rng = np.random.default_rng([seed, 0 if split == "train" else 1, index])
    key = f"{split}{index:08d}"
    if split != "train":
        scene = random_scene(rng)
        img = render_scene(scene, *_image_size(rng, size_range), rng)
        return key, {"jpg": encode_jpeg(img), "txt": scene.caption().encode()}
    if preference:
        if video_frac and rng.uniform() < video_frac:
            return key, _video_pair(rng, size_range)
        scene = random_scene(rng)
        img = render_scene(scene, *_image_size(rng, size_range), rng)
        wrong, attribute = changed_scene(scene, rng, pair_attributes)
        pair = {"messages": [{"role": "user", "content": "<image>\nDescribe the image."}],
                "chosen": scene.caption(), "rejected": wrong.caption(), "changed": attribute}
        return key, {"jpg": encode_jpeg(img), "json": json.dumps(pair).encode()}
    u = rng.uniform()
    if u < video_frac:
        return key, _video_sample(rng, size_range)
    if u < video_frac + multi_image_frac:
        return key, _two_image_sample(rng, size_range)
    scene = random_scene(rng)
    img = render_scene(scene, *_image_size(rng, size_range), rng)
    if rng.uniform() < caption_frac:
        return key, {"jpg": encode_jpeg(img), "txt": scene.caption().encode()}
    qa = _questions(scene)
    turns = []
    for n, q in enumerate(rng.permutation(len(qa))[: int(rng.integers(1, 4))]):
        question, answer = qa[q]
        turns.append({"from": "human", "value": ("<image>\n" if n == 0 else "") + question})
        turns.append({"from": "gpt", "value": answer})
    return key, {"jpg": encode_jpeg(img), "json": json.dumps({"conversations": turns}).encode()}


def _two_image_sample(rng: np.random.Generator, size_range) -> dict[str, bytes]:
    scenes = [random_scene(rng), random_scene(rng)]
    fields = {f"{i}.jpg": encode_jpeg(render_scene(s, *_image_size(rng, size_range), rng))
              for i, s in enumerate(scenes)}
    a, b = scenes[0].count, scenes[1].count
    answer = "the first image" if a > b else "the second image" if b > a else "they have the same number"
    which = int(rng.integers(2))
    turns = [
        {"from": "human", "value": "<image>\n<image>\nWhich image has more shapes?"},
        {"from": "gpt", "value": answer},
        {"from": "human", "value": f"Describe the {('first', 'second')[which]} image."},
        {"from": "gpt", "value": scenes[which].caption()},
    ]
    fields["json"] = json.dumps({"conversations": turns}).encode()
    return fields


def _video_sample(rng: np.random.Generator, size_range) -> dict[str, bytes]:
    fields, caption, _ = _video_frames(rng, size_range)
    fields["txt"] = caption.encode()
    fields["json"] = json.dumps({"fps": 2.0}).encode()
    return fields


def _video_pair(rng: np.random.Generator, size_range) -> dict[str, bytes]:
    """A preference pair on a video: the true motion caption vs the same shape moving another way."""
    fields, caption, direction = _video_frames(rng, size_range)
    others = [d for d in DIRECTIONS if d != direction]
    wrong = caption[: -len(direction)] + others[rng.integers(len(others))]
    fields["json"] = json.dumps({"messages": [{"role": "user", "content": "<video>\nDescribe the video."}],
                                 "fps": 2.0, "chosen": caption, "rejected": wrong, "changed": "direction"}).encode()
    return fields


def _video_frames(rng: np.random.Generator, size_range) -> tuple[dict[str, bytes], str, str]:
    """JPEG frames of one shape moving across a still background, its caption and its direction."""
    kind, colour = KINDS[rng.integers(len(KINDS))], list(COLOURS)[rng.integers(len(COLOURS))]
    direction = list(DIRECTIONS)[rng.integers(len(DIRECTIONS))]
    width, height = _image_size(rng, size_range)
    num_frames = int(rng.choice([4, 6, 8]))
    r = min(width, height) * 0.12
    dx, dy = DIRECTIONS[direction]
    background = _background(rng, width, height)
    fields = {}
    for f in range(num_frames):
        s = (f + 0.5) / num_frames  # progress along the path
        cx = width / 2 + dx * (s - 0.5) * (width - 3 * r)
        cy = height / 2 + dy * (s - 0.5) * (height - 3 * r)
        frame = background.copy()
        _draw_shape(ImageDraw.Draw(frame), kind, cx, cy, r, COLOURS[colour])
        fields[f"video.{f:03d}.jpg"] = encode_jpeg(frame)
    return fields, f"a {colour} {kind} moving {direction}", direction


def sample_texts(fields: dict[str, bytes]) -> list[str]:
    """The natural-language text of a sample (for tokenizer training)."""
    texts = []
    if "txt" in fields:
        texts.append(fields["txt"].decode())
    if "json" in fields:
        meta = json.loads(fields["json"])
        for turn in meta.get("conversations", meta.get("messages", [])):
            value = turn.get("value", turn.get("content", ""))
            for placeholder in ("<image>\n", "<image>", "<video>\n", "<video>"):
                value = value.replace(placeholder, "")
            texts.append(value)
        texts += [meta[k] for k in ("chosen", "rejected") if k in meta]
    return texts


def train_tokenizer(texts, out_dir: str, vocab_size: int = 1024) -> dict:
    """Train a byte-level BPE on ``texts`` and save it with the chat template as a HF tokenizer directory.

    Returns {token: id} of the special tokens. The special tokens get the first ids, in SPECIAL_TOKENS order.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    chat_words = ["system\n" + SYSTEM_PROMPT, "user\n", "assistant\n"]
    tok.train_from_iterator(list(texts) + chat_words * 100, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=list(SPECIAL_TOKENS[1:]))
    fast.chat_template = CHAT_TEMPLATE
    tmp = out_dir.rstrip("/") + f".tmp-{os.getpid()}"
    fast.save_pretrained(tmp)
    if os.path.isdir(out_dir):
        import shutil

        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}


def _write_split(out_dir, num, samples_per_shard, make, texts, bar):
    os.makedirs(out_dir, exist_ok=True)
    shards = []
    for shard_idx, start in enumerate(range(0, num, samples_per_shard)):
        def gen(start=start):
            for i in range(start, min(start + samples_per_shard, num)):
                key, fields = make(i)
                texts.extend(sample_texts(fields))
                bar.update(1)
                yield key, fields

        path = os.path.join(out_dir, f"shard-{shard_idx:06d}.tar")
        write_shard(path, gen())
        shards.append(os.path.basename(path))
    return shards


def _write_text_atomic(path: str, text: str):
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def make_dataset(out: str, num: int, seed: int = 0, *, num_eval: int = 64, size_range=(56, 112),
                 samples_per_shard: int = 1000, multi_image_frac: float = 0.1, video_frac: float = 0.0,
                 caption_frac: float = 0.5, vocab_size: int = 1024, progress: bool = False,
                 preference: bool = False, pair_attributes=ATTRIBUTES) -> dict:
    """Write train/ and eval/ shards, tokenizer/, meta.json and data.yaml under ``out``; returns the meta.
    ``preference``: the training split holds preference pairs (the rejected caption changes one of
    ``pair_attributes``) and data.yaml sets ``preference: true``."""
    from tqdm import tqdm

    pair_attributes = check_pair_attributes(pair_attributes)
    out = os.path.abspath(out)
    os.makedirs(out, exist_ok=True)
    texts: list[str] = []
    with tqdm(total=num + num_eval, desc="synthetic samples", unit="sample",
              disable=not (progress and sys.stderr.isatty())) as bar:
        train = _write_split(
            os.path.join(out, "train"), num, samples_per_shard,
            lambda i: make_sample(i, seed, size_range=size_range, multi_image_frac=multi_image_frac,
                                  video_frac=video_frac, caption_frac=caption_frac, preference=preference,
                                  pair_attributes=pair_attributes),
            texts, bar)
        evals = _write_split(os.path.join(out, "eval"), num_eval, samples_per_shard,
                             lambda i: make_sample(i, seed, size_range=size_range, split="eval"), [], bar)
    # the tokenizer learns from the training text only; held-out captions use the same small vocabulary
    special = train_tokenizer(texts, os.path.join(out, "tokenizer"), vocab_size=vocab_size)
    from transformers import AutoTokenizer

    vocab = len(AutoTokenizer.from_pretrained(os.path.join(out, "tokenizer")))
    meta = {"num_train": num, "num_eval": num_eval, "seed": seed, "image_size": list(size_range),
            "train_shards": train, "eval_shards": evals, "vocab_size": vocab, "special_tokens": special,
            "preference": preference, **({"pair_attributes": list(pair_attributes)} if preference else {})}
    _write_text_atomic(os.path.join(out, "meta.json"), json.dumps(meta, indent=2) + "\n")
    _write_text_atomic(os.path.join(out, "data.yaml"),
                       f"data_path: {os.path.join(out, 'train')}\n"
                       f"eval_data_path: {os.path.join(out, 'eval')}\n"
                       f"tokenizer_dir: {os.path.join(out, 'tokenizer')}\n"
                       + ("preference: true\n" if preference else ""))
    return meta
