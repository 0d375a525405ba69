"""tools/prepare_dataset.py: LLaVA / messages / preference files -> shards that check_dataset reads whole."""
import io
import json
import os
import sys

import numpy as np
import pytest
from PIL import Image

from mllm_mega.data import synthetic
from mllm_mega.data.config import tool_config
from mllm_mega.data.convert import ConvertError, prepare_dataset
from mllm_mega.data.shards import iter_shard, list_shards

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(REPO, "tools"))
import check_dataset  # noqa: E402
import prepare_dataset as prepare_cli  # noqa: E402


def _image(path, h, w, fmt, seed):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, format=fmt)
    path.write_bytes(buf.getvalue())
    return buf.getvalue()


def _conv(*pairs):
    return [{"from": f, "value": v} for f, v in pairs]


LLAVA = [
    {"id": "r0", "image": "imgs/a.jpg", "conversations": _conv(("human", "<image>\nWhat is this?"), ("gpt", "Noise."))},
    {"id": "r1", "image": ["imgs/a.jpg", "imgs/b.png"],
     "conversations": _conv(("human", "<image>\n<image>\nCompare them."), ("gpt", "The same noise."))},
    {"id": "r2", "conversations": _conv(("human", "Hi"), ("gpt", "Hello."))},                     # text only
    {"id": "r3", "image": "imgs/nope.jpg", "conversations": _conv(("human", "<image>\nWhat?"), ("gpt", "x"))},
    {"id": "r4", "image": "imgs/a.jpg", "conversations": _conv(("human", "<image> <image> Two?"), ("gpt", "x"))},
    {"id": "r5", "image": "imgs/a.jpg", "conversations": _conv(("human", "<image>"), ("bot", "x"))},
    {"id": "r6", "image": "imgs/a.jpg", "conversations": []},
    "not an object",
    {"id": "r8", "conversations": [{"from": "human", "value": 3}, {"from": "gpt", "value": "x"}]},
    {"id": "r9", "image": "imgs/b.png",
     "conversations": _conv(("system", "Be brief."), ("human", "<image>Colour?"), ("gpt", "Grey."))},
    {"id": "r10", "image": "imgs/c.heic", "conversations": _conv(("human", "<image>"), ("gpt", "x"))},
    {"id": "r11", "image": "imgs/a.jpg", "conversations": _conv(("human", "<image>\nOnly a question"))},
]
LLAVA_BAD = {3: "missing_image_file", 4: "placeholder_mismatch", 5: "unknown_role", 6: "empty_conversation",
             7: "malformed_row", 8: "malformed_row", 10: "unsupported_media", 11: "empty_conversation"}

MESSAGES = [
    json.dumps({"messages": [{"role": "user", "content": "<image>Describe.\u2028"},
                             {"role": "assistant", "content": "Dots."}], "images": ["imgs/a.jpg"]}, ensure_ascii=False),
    json.dumps({"messages": [{"role": "user", "content": [{"type": "image", "image": "imgs/b.png"},
                                                          {"type": "text", "text": "What?"}]},
                             {"role": "assistant", "content": [{"type": "text", "text": "A square."}]}]}),
    "{broken json",
    json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "tool", "content": "x"}]}),
    json.dumps({"messages": [{"role": "user", "content": "<image>"}, {"role": "assistant", "content": "x"}],
                "images": ["imgs/a.jpg", "imgs/b.png"]}),
    json.dumps({"messages": [{"role": "user", "content": [{"type": "image", "image": "imgs/gone.png"}]},
                             {"role": "assistant", "content": "x"}]}),
    "",  # blank lines are not rows
    json.dumps({"conversations": [{"from": "human", "value": "<image>\nShape?"}, {"from": "gpt", "value": "None."}],
                "images": ["imgs/b.png"]}),
    json.dumps({"messages": [{"role": "user", "content": "<video>What moves?"}, {"role": "assistant", "content": "Nothing."}],
                "videos": [["imgs/f0.jpg", "imgs/f1.jpg"]]}),
]
MESSAGES_BAD = {2: "malformed_row", 3: "unknown_role", 4: "placeholder_mismatch", 5: "missing_image_file"}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("convert")
    (root / "imgs").mkdir()
    images = {"a.jpg": _image(root / "imgs" / "a.jpg", 40, 48, "JPEG", 0),
              "b.png": _image(root / "imgs" / "b.png", 36, 30, "PNG", 1)}
    for i in range(2):
        _image(root / "imgs" / f"f{i}.jpg", 32, 32, "JPEG", 2 + i)
    (root / "imgs" / "c.heic").write_bytes(b"\0\0\0\x18ftypheic")
    (root / "llava.json").write_text(json.dumps(LLAVA))
    (root / "messages.jsonl").write_text("\n".join(MESSAGES) + "\n", encoding="utf-8")
    synthetic.train_tokenizer(["what is this", "noise hello grey dots"], str(root / "tok"), vocab_size=300)
    return root, images


def _check(out, tok):
    cfg = tool_config(str(out), tokenizer=str(tok), decoder="pil", epochs=1, max_consecutive_skips=0)
    return check_dataset.check(cfg, progress=False)


def _samples(out):
    return {raw.key: raw.fields for s in list_shards(str(out)) for raw, _ in iter_shard(s)}


def _stamps(out):
    return {n: (os.stat(out / n).st_mtime_ns, os.stat(out / n).st_ino) for n in sorted(os.listdir(out))
            if n.endswith(".tar")}


def test_llava_converts_checks_and_resumes(inputs):
    root, images = inputs
    out = root / "llava_out"
    report = prepare_dataset("llava", str(root / "llava.json"), str(out), samples_per_shard=4, workers=2)
    assert {b["row"]: b["reason"] for b in report["bad"]} == LLAVA_BAD
    assert json.loads((out / "report.json").read_text()) == report
    # rows 4-7 are all bad: no empty shard for the loader
    assert sorted(_stamps(out)) == ["shard-000000.tar", "shard-000002.tar"]
    summary = _check(out, root / "tok")
    assert summary["samples_ok"] == len(LLAVA) - len(LLAVA_BAD) == report["samples"] and summary["skipped"] == {}
    samples = _samples(out)
    assert sorted(samples) == [f"{i:09d}" for i in range(len(LLAVA)) if i not in LLAVA_BAD]
    one = samples["000000001"]
    assert one["0.jpg"] == images["a.jpg"] and one["1.png"] == images["b.png"]  # original bytes, in order
    assert json.loads(one["json"]) == {"conversations": LLAVA[1]["conversations"], "id": "r1"}
    nine = samples["000000009"]
    assert nine["png"] == images["b.png"] and json.loads(nine["json"])["conversations"] == LLAVA[9]["conversations"]

    # rerun with the same input: nothing rewritten, the same report; a killed run's temporary file is cleared
    stamps = _stamps(out)
    (out / "shard-000001.tar.tmp-99").write_bytes(b"partial")
    again = prepare_dataset("llava", str(root / "llava.json"), str(out), samples_per_shard=4, workers=2)
    assert _stamps(out) == stamps and again["shards_written"] == 0 and not (out / "shard-000001.tar.tmp-99").exists()
    assert {k: v for k, v in again.items() if not k.startswith("shards_")} == \
        {k: v for k, v in report.items() if not k.startswith("shards_")}
    # one changed row: only its shard is rewritten, with the new text
    changed = json.loads(json.dumps(LLAVA))
    changed[9]["conversations"][2]["value"] = "Dark grey."
    (root / "llava2.json").write_text(json.dumps(changed))
    third = prepare_dataset("llava", str(root / "llava2.json"), str(out), samples_per_shard=4, workers=1)
    now = _stamps(out)
    assert third["shards_written"] == 1 and now["shard-000000.tar"] == stamps["shard-000000.tar"]
    assert now["shard-000002.tar"] != stamps["shard-000002.tar"]
    assert json.loads(_samples(out)["000000009"]["json"])["conversations"][2]["value"] == "Dark grey."
    # a shorter input: the shards past its end go (they would still be read), the rest is kept
    (root / "llava3.json").write_text(json.dumps(LLAVA[:6]))
    fourth = prepare_dataset("llava", str(root / "llava3.json"), str(out), samples_per_shard=4)
    assert _stamps(out) == {"shard-000000.tar": stamps["shard-000000.tar"]} and fourth["samples"] == 3
    with pytest.raises(ConvertError, match="samples_per_shard=4, this run has 5"):
        prepare_dataset("llava", str(root / "llava.json"), str(out), samples_per_shard=5)


def test_messages_jsonl_through_the_cli(inputs, capsys):
    root, images = inputs
    out = root / "messages_out"
    prepare_cli.main(["--format", "messages", "--input", str(root / "messages.jsonl"), "--out", str(out),
                      "--workers", "2", "--samples-per-shard", "3"])
    lines = capsys.readouterr().out.strip().splitlines()
    summary = json.loads(lines[-1])
    assert summary["bad_by_reason"] == {"malformed_row": 1, "missing_image_file": 1, "placeholder_mismatch": 1,
                                        "unknown_role": 1}
    assert any("bad rows [unknown_role]: 1, e.g. row 3: conversation turn 1 has role 'tool'" in l for l in lines)
    report = json.loads((out / "report.json").read_text())
    assert {b["row"]: b["reason"] for b in report["bad"]} == MESSAGES_BAD
    good = 8 - len(MESSAGES_BAD)  # 8 rows: the blank line is none
    assert summary["rows"] == 8 and summary["samples"] == good
    checked = _check(out, root / "tok")
    assert checked["samples_ok"] == good and checked["skipped"] == {} and checked["videos"] == 1
    samples = _samples(out)
    parts = samples["000000001"]
    assert parts["png"] == images["b.png"]
    assert json.loads(parts["json"])["conversations"] == [{"from": "human", "value": "<image>What?"},
                                                         {"from": "gpt", "value": "A square."}]
    video = samples["000000007"]  # row 7 (the blank line does not count)
    assert sorted(video) == ["json", "video0.000.jpg", "video0.001.jpg"]
    assert video["video0.001.jpg"] == (root / "imgs" / "f1.jpg").read_bytes()


def test_preference_pairs(inputs):
    root, images = inputs
    rows = [
        {"prompt": "<image>\nWhich colour?", "chosen": "grey", "rejected": "red", "images": ["imgs/a.jpg"]},
        {"prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Count?"}]}],
         "chosen": [{"role": "assistant", "content": "none"}], "rejected": [{"role": "assistant", "content": "two"}],
         "images": ["imgs/b.png"], "id": 7},
        {"prompt": "Q", "chosen": "a"},
        {"prompt": "Q", "chosen": " ", "rejected": "b"},
        {"prompt": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}], "chosen": "a",
         "rejected": "b"},
    ]
    (root / "pref.json").write_text(json.dumps(rows))
    report = prepare_dataset("preference", str(root / "pref.json"), str(root / "pref_out"))
    assert [(b["row"], b["reason"]) for b in report["bad"]] == [(2, "malformed_row"), (3, "empty_conversation"),
                                                                (4, "malformed_row")]
    samples = _samples(root / "pref_out")
    assert sorted(samples) == ["000000000", "000000001"]
    assert samples["000000000"]["jpg"] == images["a.jpg"] and samples["000000001"]["png"] == images["b.png"]
    assert json.loads(samples["000000000"]["json"]) == {
        "conversations": [{"from": "human", "value": "<image>\nWhich colour?"}], "chosen": "grey", "rejected": "red"}
    assert json.loads(samples["000000001"]["json"]) == {
        "conversations": [{"from": "human", "value": "<image>Count?"}], "chosen": "none", "rejected": "two", "id": 7}


def test_bad_input_exits_2(inputs, tmp_path, capsys):
    root, _ = inputs
    (tmp_path / "bad.json").write_text("{\"a\": ")
    (tmp_path / "stray").mkdir()
    (tmp_path / "stray" / "x.tar").write_bytes(b"")
    for argv, message in [
        (["--input", str(tmp_path / "none.json"), "--out", str(tmp_path / "o")], "is not a file"),
        (["--input", str(tmp_path / "bad.json"), "--out", str(tmp_path / "o")], "bad.json: not valid JSON"),
        (["--input", str(root / "llava.json"), "--out", str(tmp_path / "stray")], "no manifest.json"),
        (["--input", str(root / "llava.json"), "--out", str(tmp_path / "o"), "--samples-per-shard", "0"], ">= 1"),
        (["--input", str(root / "llava.json"), "--out", str(root / "llava.json")], "cannot create the output folder"),
    ]:
        with pytest.raises(SystemExit) as exc:
            prepare_cli.main(["--format", "llava", *argv])
        err = capsys.readouterr().err
        assert exc.value.code == 2 and "error: " in err and message in err, (argv, err)
    assert not (tmp_path / "stray" / "manifest.json").exists()  # nothing written on a refused --out


def test_written_field_names_are_the_loaders():
    from mllm_mega.data import samples
    from mllm_mega.data.convert import FRAME_EXTENSIONS, IMAGE_EXTENSIONS, VIDEO_EXTENSIONS

    for ext in set(IMAGE_EXTENSIONS.values()):
        assert samples._IMAGE_FIELD.match(ext) and samples._IMAGE_FIELD.match(f"1.{ext}"), ext
    for ext in set(FRAME_EXTENSIONS.values()):
        assert samples._FRAME_FIELD.match(f"video0.000.{ext}"), ext
    for ext in set(VIDEO_EXTENSIONS.values()):
        assert samples._VIDEO_FILE_FIELD.match(f"video0.{ext}"), ext
