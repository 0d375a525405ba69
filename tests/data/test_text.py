"""Tokenization: the chat template's text, labels only on assistant turns, placeholder expansion."""
import json

import numpy as np
import pytest

from mllm_mega.data import synthetic
from mllm_mega.data.text import IMAGE, VIDEO, TextProcessor, conversation_messages, insert_vision_blocks
from mllm_mega.data.vision import BadSample


@pytest.fixture(scope="module")
def proc(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    texts = ["How many shapes are there?", "two red circles on the left", "What colour?", "blue"] * 50
    synthetic.train_tokenizer(texts, str(out / "tokenizer"), vocab_size=400)
    return TextProcessor(str(out / "tokenizer"))


def _decode(proc, ids):
    return proc.tokenizer.decode(list(ids), skip_special_tokens=False)


def test_conversation_text_and_assistant_only_labels(proc):
    turns = [{"from": "human", "value": "<image>\nHow many shapes are there?"}, {"from": "gpt", "value": "two"},
             {"from": "human", "value": "What colour?"}, {"from": "gpt", "value": "blue"}]
    messages = insert_vision_blocks(conversation_messages({"conversations": turns}), 1, 0, proc)
    enc = proc.encode_conversation(messages)
    rendered = proc.tokenizer.apply_chat_template(messages, tokenize=False)
    # the pieces put together are exactly the template's rendering (default system turn included)
    assert _decode(proc, enc.ids) == rendered
    assert rendered.startswith("<|im_start|>system\n")
    sup = np.array(enc.supervised)
    ids = np.array(enc.ids)
    # supervised runs are the two answers, each with its end-of-turn token
    runs, cur = [], []
    for i, s in zip(ids, sup):
        if s:
            cur.append(i)
        elif cur:
            runs.append(cur)
            cur = []
    assert [_decode(proc, r) for r in runs] == ["two<|im_end|>", "blue<|im_end|>"]
    # no supervised token in the user turns or headers
    assert not any(sup[ids == proc.image_token_id])


def test_caption_encoding(proc):
    enc = proc.encode_caption(["image", "image"], "two red circles on the left")
    assert _decode(proc, enc.ids) == "<|vision_start|><|image_pad|><|vision_end|>" * 2 + \
        "two red circles on the left<|endoftext|>"
    sup_ids = [i for i, s in zip(enc.ids, enc.supervised) if s]
    assert _decode(proc, sup_ids) == "two red circles on the left<|endoftext|>"
    assert enc.ids[: len(proc.caption_prompt(["image"]))] == proc.caption_prompt(["image"])


def test_expand_placeholders(proc):
    enc = proc.encode_caption(["image", "video"], "blue")
    ids, sup, types = proc.expand(enc, [(IMAGE, 6), (VIDEO, 10)])
    assert (ids == proc.image_token_id).sum() == 6 and (ids == proc.video_token_id).sum() == 10
    assert (types == IMAGE).sum() == 6 and (types == VIDEO).sum() == 10
    assert len(ids) == len(enc.ids) + 5 + 9 and not sup[types != 0].any()
    # the image run sits between its vision start/end tokens
    first = np.flatnonzero(types == IMAGE)
    assert ids[first[0] - 1] == proc.vision_start_id and ids[first[-1] + 1] == proc.vision_end_id
    with pytest.raises(BadSample):
        proc.expand(enc, [(IMAGE, 6)])
    with pytest.raises(BadSample):
        proc.expand(enc, [(VIDEO, 6), (IMAGE, 4)])


def test_placeholder_rules(proc):
    msgs = lambda text: conversation_messages({"conversations": [{"from": "human", "value": text},  # noqa: E731
                                                                 {"from": "gpt", "value": "x"}]})
    # no placeholder: the images go in front of the first user turn
    m = insert_vision_blocks(msgs("Describe."), 2, 0, proc)
    assert m[0]["content"].count("<|image_pad|>") == 2 and m[0]["content"].endswith("Describe.")
    with pytest.raises(BadSample) as exc:
        insert_vision_blocks(msgs("<image> and <image>"), 1, 0, proc)
    assert exc.value.reason == "missing_image"
    with pytest.raises(BadSample) as exc:
        insert_vision_blocks(msgs("<image>"), 2, 0, proc)
    assert exc.value.reason == "unused_image"


@pytest.mark.parametrize("obj", [[], {"conversations": "hi"}, {"conversations": []},
                                 {"conversations": [{"from": "robot", "value": "x"}]},
                                 {"conversations": [{"from": "human", "value": 3}]},
                                 {"conversations": [{"from": "human", "value": "only a question"}]}])
def test_malformed_conversations(obj):
    with pytest.raises(BadSample) as exc:
        conversation_messages(json.loads(json.dumps(obj)))
    assert exc.value.reason == "json_malformed"


def test_openai_style_messages(proc):
    m = conversation_messages({"messages": [{"role": "system", "content": "Be brief."},
                                            {"role": "user", "content": "Hi"},
                                            {"role": "assistant", "content": "blue"}]})
    enc = proc.encode_conversation(m)
    assert _decode(proc, enc.ids).startswith("<|im_start|>system\nBe brief.<|im_end|>")
    assert _decode(proc, [i for i, s in zip(enc.ids, enc.supervised) if s]) == "blue<|im_end|>"
