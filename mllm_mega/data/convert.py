"""Dataset converters: LLaVA, messages (ShareGPT) and preference-pair files -> this project's WebDataset shards.

    summary = prepare_dataset("llava", "llava_v1_5_mix665k.json", "shards/llava", image_root="images/")

Input formats (a JSON list of rows, or JSONL with one row a line):
  llava       LLaVA-Pretrain / LLaVA-Instruct: {"id", "image": path | [paths], "conversations": [{"from":
              "human" | "gpt" | "system", "value": str}]}, each image named by an ``<image>`` tag in the values.
  messages    ShareGPT as ms-swift / LLaMA-Factory write it: {"messages": [{"role": "user" | "assistant" |
              "system", "content": str | [part]}], "images": [path], "videos": [path]} ("conversations" with
              from/value also read). A part is {"type": "text", "text"}, {"type": "image"[, "image": path]} or
              {"type": "video"[, "video": path]}: a placeholder, naming its file when the row has no images/videos
              list. ``<image>`` / ``<video>`` tags in string content are placeholders too. A video is a file
              (mp4, webm, mkv, mov, avi) or a list of frame images.
  preference  TRL's preference pairs: {"prompt": str | messages, "chosen": str | [assistant message],
              "rejected": same, "images": [path]}.
Relative paths are under ``image_root`` (default: the input file's folder); URLs are not fetched.

Output, the sample format of samples.py (key = the row's 0-based index, nine digits): a ``json`` field
{"conversations": [{"from": "human" | "gpt" | "system", "value": str}], "id": <the row's id, if any>} with the
placeholders kept as ``<image>`` / ``<video>``; images as ``jpg`` / ``png`` / ``webp`` / ``gif`` / ``bmp`` / ``tiff`` (several: ``0.jpg``,
``1.png``, ...), videos as ``video0.mp4`` or frames ``video0.000.jpg``, ...; every file copied byte for byte.

Preference pairs (trained on by the preference objective, not by the next-token loader): the same, with the
``json`` holding {"conversations": <the prompt, ending with a human turn>, "chosen": str, "rejected": str}.

Shard k holds the good rows among rows [k * samples_per_shard, (k + 1) * samples_per_shard). A bad row is
left out and recorded with its reason (BAD_ROW_REASONS) in OUT/report.json; nothing stops the conversion. Each
shard is written under a temporary name and renamed when complete, then recorded in OUT/manifest.json with a
hash of its input rows: a rerun keeps every recorded shard whose rows are unchanged (not rewritten), rewrites
the others, and deletes shards past the end of a shorter input. Image files are not hashed: replace an image
in place and a rerun will not notice (use a new OUT).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import threading
from concurrent.futures import ThreadPoolExecutor, as_completed

from mllm_mega.data.shards import write_shard
from mllm_mega.data.text import IMAGE_PLACEHOLDER, ROLES, VIDEO_PLACEHOLDER

FORMATS = ("llava", "messages", "preference")
DEFAULT_SAMPLES_PER_SHARD = 10000  # Open-Qwen2VL's shard size
MANIFEST_VERSION = 1
BAD_ROW_REASONS = {
    "malformed_row": "not a JSON object (or not JSON at all), a required key missing, a value of the wrong type",
    "unknown_role": "a turn whose role is not user/human, assistant/gpt or system",
    "empty_conversation": "no turns, no assistant turn with text, or an empty chosen/rejected answer",
    "placeholder_mismatch": "the number of <image> (<video>) placeholders differs from the number of images (videos)",
    "missing_image_file": "an image or video file that does not exist or cannot be read (or a URL)",
    "unsupported_media": "an image or video file type the loader does not read",
}
IMAGE_EXTENSIONS = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png", ".webp": "webp", ".gif": "gif", ".bmp": "bmp",
                    ".tif": "tiff", ".tiff": "tiff"}  # samples.py's image fields
FRAME_EXTENSIONS = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png", ".webp": "webp"}  # samples.py's video frames
VIDEO_EXTENSIONS = {".mp4": "mp4", ".webm": "webm", ".mkv": "mkv", ".mov": "mov", ".avi": "avi"}
_FROM = {"user": "human", "assistant": "gpt", "system": "system"}  # ROLES' targets -> LLaVA's "from"


class ConvertError(ValueError):
    """Bad input or output as a whole (the tool exits 2); bad rows are reported, not raised."""


class BadRow(Exception):
    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


class _Unparsable:
    def __init__(self, message: str):
        self.message = message


# ------------------------------------------------------------------------------------------------- rows
def _turns(turns, where: str = "conversation") -> list[dict]:
    """[{"from"/"role", "value"/"content"}] -> [{"from", "value"}]; content parts become text + placeholders."""
    if not isinstance(turns, list):
        raise BadRow("malformed_row", f"{where} is not a list")
    out = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise BadRow("malformed_row", f"{where} turn {i} is not an object")
        role = turn.get("role", turn.get("from"))
        if role not in ROLES:
            raise BadRow("unknown_role", f"{where} turn {i} has role {role!r}")
        out.append({"from": _FROM[ROLES[role]], "value": _content(turn.get("content", turn.get("value")), i)})
    return out


def _content(content, i: int) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise BadRow("malformed_row", f"turn {i} content is {type(content).__name__}, not a string or a list of parts")
    text = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            text.append(part["text"])
        elif kind in ("image", "video"):
            text.append(IMAGE_PLACEHOLDER if kind == "image" else VIDEO_PLACEHOLDER)
        else:
            raise BadRow("malformed_row", f"turn {i} has a content part {part!r} (want type text/image/video)")
    return "".join(text)


def _part_paths(turns, kind: str) -> list:
    """Files named by the image (video) parts of messages, in order (for rows without an images list)."""
    paths = []
    for turn in turns if isinstance(turns, list) else []:
        content = turn.get("content") if isinstance(turn, dict) else None
        for part in content if isinstance(content, list) else []:
            if isinstance(part, dict) and part.get("type") == kind:
                path = part.get(kind, part.get("path"))
                if path is not None:
                    paths.append(path)
    return paths


def _path_list(row: dict, key: str, fallback: list) -> list:
    value = row.get(key)
    if value is None or value == []:
        return fallback
    value = [value] if isinstance(value, str) else value
    if not isinstance(value, list):
        raise BadRow("malformed_row", f"{key!r} is {type(value).__name__}, not a path or a list of paths")
    return value


def _read(path, root: str, table: dict, what: str) -> tuple[str, bytes]:
    if not isinstance(path, str) or not path:
        raise BadRow("malformed_row", f"{what} path {path!r} is not a non-empty string")
    if "://" in path:
        raise BadRow("missing_image_file", f"{what} {path!r} is a URL (not fetched)")
    ext = table.get(os.path.splitext(path)[1].lower())
    if ext is None:
        raise BadRow("unsupported_media", f"{what} {path!r}: type not one of {sorted(set(table))}")
    full = path if os.path.isabs(path) else os.path.join(root, path)
    try:
        with open(full, "rb") as f:
            return ext, f.read()
    except OSError as exc:
        raise BadRow("missing_image_file", f"{what} {full}: {exc.strerror or exc}") from None


def _media_fields(images: list, videos: list, root: str) -> dict[str, bytes]:
    fields = {}
    for i, path in enumerate(images):
        ext, data = _read(path, root, IMAGE_EXTENSIONS, "image")
        fields[ext if len(images) == 1 else f"{i}.{ext}"] = data
    for i, video in enumerate(videos):
        if isinstance(video, list):  # a video given as its frames
            for j, frame in enumerate(video):
                ext, data = _read(frame, root, FRAME_EXTENSIONS, "video frame")
                fields[f"video{i}.{j:03d}.{ext}"] = data
        else:
            ext, data = _read(video, root, VIDEO_EXTENSIONS, "video")
            fields[f"video{i}.{ext}"] = data
    return fields


def _check_placeholders(texts: list[str], num_images: int, num_videos: int):
    n_img = sum(t.count(IMAGE_PLACEHOLDER) for t in texts)
    n_vid = sum(t.count(VIDEO_PLACEHOLDER) for t in texts)
    if (n_img, n_vid) != (num_images, num_videos):
        raise BadRow("placeholder_mismatch", f"{n_img} <image> / {n_vid} <video> placeholders for "
                                             f"{num_images} images / {num_videos} videos")


def _answer(value, key: str) -> str:
    """A preference answer: a string, or a list holding one assistant message."""
    if isinstance(value, list):
        turns = _turns(value, key)
        if len(turns) != 1 or turns[0]["from"] != "gpt":
            raise BadRow("malformed_row", f"{key!r} must be a string or one assistant message")
        value = turns[0]["value"]
    if not isinstance(value, str):
        raise BadRow("malformed_row", f"{key!r} is {type(value).__name__}, not a string or a message list")
    if not value.strip():
        raise BadRow("empty_conversation", f"{key!r} is empty")
    return value


def convert_row(fmt: str, row, root: str) -> dict[str, bytes]:
    """One input row -> the sample's fields; raises BadRow naming the reason (BAD_ROW_REASONS)."""
    if isinstance(row, _Unparsable):
        raise BadRow("malformed_row", row.message)
    if not isinstance(row, dict):
        raise BadRow("malformed_row", f"row is {type(row).__name__}, not an object")
    extra: dict = {}
    if fmt == "preference":
        missing = [k for k in ("prompt", "chosen", "rejected") if k not in row]
        if missing:
            raise BadRow("malformed_row", f"no {missing} in the row")
        prompt = row["prompt"]
        turns = [{"from": "human", "value": prompt}] if isinstance(prompt, str) else _turns(prompt, "prompt")
        raw_turns = prompt if isinstance(prompt, list) else []
        if not turns:
            raise BadRow("empty_conversation", "the prompt has no turns")
        if turns[-1]["from"] != "human":
            raise BadRow("malformed_row", "the prompt must end with a user turn")
        extra = {"chosen": _answer(row["chosen"], "chosen"), "rejected": _answer(row["rejected"], "rejected")}
    else:
        key = "conversations" if fmt == "llava" else ("messages" if "messages" in row else "conversations")
        if key not in row:
            raise BadRow("malformed_row", f"no {key!r} in the row")
        raw_turns = row[key]
        turns = _turns(raw_turns)
        if not any(t["from"] == "gpt" and t["value"].strip() for t in turns):
            raise BadRow("empty_conversation", "no turns" if not turns else "no assistant turn with text")
    images = _path_list(row, "image" if fmt == "llava" else "images", _part_paths(raw_turns, "image"))
    videos = [] if fmt == "llava" else _path_list(row, "videos", _part_paths(raw_turns, "video"))
    _check_placeholders([t["value"] for t in turns] + list(extra.values()), len(images), len(videos))
    fields = _media_fields(images, videos, root)
    meta = {"conversations": turns, **extra}
    if "id" in row:
        meta["id"] = row["id"]
    fields["json"] = json.dumps(meta, ensure_ascii=False).encode()
    return fields


def read_rows(path: str) -> list:
    """The rows of a JSON list or a JSONL file (an unparsable JSONL line becomes a malformed row)."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConvertError(f"cannot read the input {path!r}: {exc}") from None
    if not path.endswith(".jsonl"):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as exc:
            if not exc.msg.startswith("Extra data"):  # else: JSONL named .json
                raise ConvertError(f"{path}: not valid JSON ({exc})") from None
        else:
            if not isinstance(rows, list):
                raise ConvertError(f"{path}: expected a JSON list of rows, got {type(rows).__name__}")
            return rows
    rows = []
    # split on newlines only: str.splitlines would also cut at U+2028 etc., which JSON strings may hold raw
    for number, line in enumerate(text.split("\n"), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                rows.append(_Unparsable(f"line {number} is not JSON: {exc}"))
    return rows


def _rows_hash(rows) -> str:
    h = hashlib.blake2b(digest_size=16)
    for row in rows:
        text = row.message if isinstance(row, _Unparsable) else json.dumps(row, sort_keys=True, ensure_ascii=False)
        h.update(text.encode() + b"\n")
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------- shards
def _write_json_atomic(path: str, obj):
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)


def _convert_shard(fmt, rows, start, root, path, on_row) -> dict:
    bad = []

    def samples():
        for index, row in enumerate(rows, start):
            try:
                fields = convert_row(fmt, row, root)
            except BadRow as exc:
                entry = {"row": index, "reason": exc.reason, "message": str(exc)}
                if isinstance(row, dict) and "id" in row:
                    entry["id"] = row["id"]
                bad.append(entry)
            else:
                yield f"{index:09d}", fields
            on_row()

    count = write_shard(path, samples())
    name = os.path.basename(path)
    if count == 0:  # every row bad: no empty tar for the loader to open
        os.unlink(path)
        name = None
    return {"file": name, "bytes": os.path.getsize(path) if name else 0, "samples": count, "bad": bad}


def _load_manifest(out: str, options: dict) -> dict:
    path = os.path.join(out, "manifest.json")
    if not os.path.exists(path):
        if any(n.endswith(".tar") for n in os.listdir(out)):
            raise ConvertError(f"{out} holds .tar files but no manifest.json: not written by this tool; "
                               "give an empty or new --out")
        return {}
    try:
        with open(path) as f:
            manifest = json.load(f)
        saved = {k: manifest[k] for k in options}
        shards = dict(manifest["shards"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConvertError(f"{path} is not a manifest of this tool ({exc}); give a new --out") from None
    for key, value in options.items():
        if saved[key] != value:
            raise ConvertError(f"{out} was written with {key}={saved[key]!r}, this run has {value!r}; "
                               "use the same settings to resume, or a new --out")
    return shards


def _complete(out: str, entry: dict | None, rows_range, rows_hash) -> bool:
    if entry is None or entry.get("rows") != list(rows_range) or entry.get("rows_hash") != rows_hash:
        return False
    if entry["file"] is None:
        return True
    path = os.path.join(out, entry["file"])
    return os.path.isfile(path) and os.path.getsize(path) == entry["bytes"]


def prepare_dataset(fmt: str, input_path: str, out: str, *, image_root: str | None = None,
                    samples_per_shard: int = DEFAULT_SAMPLES_PER_SHARD, workers: int = 4,
                    progress: bool = False) -> dict:
    """Convert ``input_path`` into shards under ``out`` (resuming a previous run there); returns the report."""
    from tqdm import tqdm

    if fmt not in FORMATS:
        raise ConvertError(f"format must be one of {FORMATS}, got {fmt!r}")
    if samples_per_shard < 1 or workers < 1:
        raise ConvertError(f"samples_per_shard and workers must be >= 1, got {samples_per_shard}, {workers}")
    if not os.path.isfile(input_path):
        raise ConvertError(f"input {input_path!r} is not a file")
    root = os.path.abspath(image_root if image_root is not None else os.path.dirname(os.path.abspath(input_path)))
    if not os.path.isdir(root):
        raise ConvertError(f"image root {root!r} is not a directory")
    rows = read_rows(input_path)
    if not rows:
        raise ConvertError(f"{input_path}: no rows")
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as exc:
        raise ConvertError(f"cannot create the output folder {out!r}: {exc}") from None
    for name in os.listdir(out):  # left by a killed run (one conversion per folder at a time)
        if re.fullmatch(r"(shard-\d+\.tar|manifest\.json|report\.json)\.tmp-\d+", name):
            os.unlink(os.path.join(out, name))
    options = {"version": MANIFEST_VERSION, "format": fmt, "samples_per_shard": samples_per_shard,
               "image_root": root}
    previous = _load_manifest(out, options)
    plan = {}
    for k, start in enumerate(range(0, len(rows), samples_per_shard)):
        stop = min(start + samples_per_shard, len(rows))
        plan[f"shard-{k:06d}.tar"] = (start, stop, _rows_hash(rows[start:stop]))
    shards = {n: previous[n] for n, (a, b, h) in plan.items() if _complete(out, previous.get(n), (a, b), h)}
    for name in set(previous) - set(plan):  # the input got shorter: its old tail must not stay readable
        if os.path.exists(os.path.join(out, name)):
            os.unlink(os.path.join(out, name))
    todo = [n for n in plan if n not in shards]
    manifest = {**options, "input": os.path.abspath(input_path), "num_rows": len(rows), "shards": shards}
    _write_json_atomic(os.path.join(out, "manifest.json"), manifest)
    lock = threading.Lock()
    with tqdm(total=sum(plan[n][1] - plan[n][0] for n in todo), desc="converting", unit="row",
              disable=not (progress and sys.stderr.isatty())) as bar:
        def on_row():
            with lock:
                bar.update(1)

        # copying files and writing tars is I/O: threads overlap it without pickling rows to processes
        with ThreadPoolExecutor(workers) as pool:
            futures = {pool.submit(_convert_shard, fmt, rows[plan[n][0]:plan[n][1]], plan[n][0], root,
                                   os.path.join(out, n), on_row): n for n in todo}
            for future in as_completed(futures):
                name = futures[future]
                start, stop, rows_hash = plan[name]
                shards[name] = {"rows": [start, stop], "rows_hash": rows_hash, **future.result()}
                _write_json_atomic(os.path.join(out, "manifest.json"), {**manifest, "shards": dict(sorted(shards.items()))})
    bad = sorted((b for n in plan for b in shards[n]["bad"]), key=lambda b: b["row"])
    by_reason: dict[str, int] = {}
    for b in bad:
        by_reason[b["reason"]] = by_reason.get(b["reason"], 0) + 1
    report = {"format": fmt, "input": os.path.abspath(input_path), "rows": len(rows),
              "samples": sum(shards[n]["samples"] for n in plan), "bad_rows": len(bad),
              "bad_by_reason": dict(sorted(by_reason.items())),
              "shards": sum(1 for n in plan if shards[n]["file"]), "shards_written": len(todo),
              "shards_kept": len(plan) - len(todo), "bad": bad}
    _write_json_atomic(os.path.join(out, "report.json"), report)
    return report
