"""DataConfig: every setting of the data pipeline (shards, tokenizer, NaViT sizes, augmentation, packing)."""
from __future__ import annotations

import dataclasses
import difflib
import glob
import os
from dataclasses import dataclass

LOSS_REWEIGHTING = ("token", "sample", "square")
DECODE_DEVICES = ("auto", "cpu", "gpu")
DECODERS = ("auto", "dali", "pil")
RESIZE_BACKENDS = ("auto", "pil", "dali")


@dataclass
class DataConfig:
    """Data pipeline settings; see mllm_mega/data/loader.py for how they are used."""

    data_path: str | list[str] = ""
    """Training shards: a directory of .tar files, a glob, a file, or a list of those."""
    datasets: list[dict] | None = None
    """A weighted mixture instead of data_path: [{path, weight, name}, ...] (path as data_path; weight > 0, default 1;
    name unique, default the path's basename). Blended by weight, each dataset sharded and repeated on its own
    (mixture.py)."""
    tokenizer_dir: str = ""
    """Hugging Face tokenizer directory (tokenizer.json + tokenizer_config.json with a chat template)."""
    eval_data_path: str | list[str] | None = None
    """Held-out caption shards for build_eval_samples (same forms as data_path)."""
    seq_len: int = 4096
    """Tokens per packed micro-batch; every micro-batch is padded to exactly this length."""
    min_pixels: int = 56 * 56
    """smart_resize lower bound on an image's resized area (HF processor default 56*56)."""
    max_pixels: int = 28 * 28 * 1280
    """smart_resize upper bound on an image's resized area (HF processor default 28*28*1280)."""
    video_min_pixels: int = 128 * 28 * 28
    """smart_resize lower bound per video frame (HF video processor default 128*28*28)."""
    video_max_pixels: int = 768 * 28 * 28
    """smart_resize upper bound per video frame (HF video processor default 768*28*28)."""
    max_video_frames: int = 16
    """Frames kept per video (uniformly spaced, rounded down to an even count)."""
    video_fps: float = 2.0
    """Frame rate of frame-sequence videos whose sample json gives no "fps"."""
    video_sample_fps: float = 2.0
    """Frames per second sampled from video files (mp4, ...), as qwen-vl-utils does for Qwen2.5-VL."""
    min_image_side: int = 10
    """Images with a side shorter than this (e.g. 1x1 tracking pixels) are skipped as image_too_small."""
    jpeg_prob: float = 0.5
    """Probability that an image is re-compressed as JPEG (InternVL2.5 augmentation); 0 disables it."""
    jpeg_quality: tuple[int, int] = (75, 100)
    """Inclusive range of the uniform JPEG quality of the augmentation."""
    max_images_per_pack: int | None = None
    """Cap on images + videos in one packed micro-batch (bounds the ViT's work per step); None = no cap."""
    max_samples_per_pack: int | None = None
    """Cap on samples in one packed micro-batch; None = no cap."""
    loss_reweighting: str = "token"
    """Per-token loss weight: token (1), sample (1/n) or square (1/sqrt(n)), n = supervised tokens of the sample."""
    truncate: bool = False
    """Cut over-long samples to seq_len when the cut falls in trailing text (never in an image); else skip them."""
    buffer_size: int = 256
    """Samples held for online packing; larger packs tighter and costs memory for their encoded images."""
    min_pack_fill: float = 0.95
    """Packs filled below this fraction of seq_len return their samples to the buffer (unless it is stuck)."""
    seed: int = 0
    """Seed of the shard order, pack order and JPEG augmentation (all hashed, no running RNG)."""
    decode_device: str = "auto"
    """Where images are decoded: gpu (DALI mixed, nvJPEG), cpu, or auto (gpu when CUDA is available)."""
    decoder: str = "auto"
    """Decoding library: dali, pil, or auto (dali when installed)."""
    resize_backend: str = "auto"
    """pil (bit-identical to HF), dali (on the decode device, a few uint8 levels off), auto (dali on GPU)."""
    num_workers: int = 2
    """Threads for decoding and resizing."""
    decode_batch_size: int = 64
    """Images per DALI batch."""
    prefetch: int = 2
    """Micro-batches prepared ahead by a background thread (0: prepare in the caller's thread)."""
    epochs: int | None = None
    """Passes over the data; None repeats forever (training), 1 for a check or an offline pack."""
    max_consecutive_skips: int = 1000
    """Stop with an error (reason counts + the first failure) after this many samples in a row were skipped, or
    a whole epoch's worth: a systematic failure (e.g. a broken decoder install) must not loop forever. 0 = never."""
    preference: bool = False
    """Read preference pairs (prompt + chosen + rejected, data/preference.py): each pair is one packing unit of two
    adjacent segments (chosen then rejected) sharing its media once; pairs are never truncated."""

    def __post_init__(self):
        if isinstance(self.data_path, (list, tuple)):
            self.data_path = [str(p) for p in self.data_path]
        if self.datasets is not None:
            if self.data_path:
                raise ValueError("give either data_path or datasets, not both")
            self.datasets = _check_datasets(self.datasets)
        if isinstance(self.jpeg_quality, list):
            self.jpeg_quality = tuple(self.jpeg_quality)
        _positive(self, "seq_len", "min_pixels", "max_pixels", "video_min_pixels", "video_max_pixels",
                  "max_video_frames", "min_image_side", "buffer_size", "num_workers", "decode_batch_size")
        if self.min_pixels > self.max_pixels:
            raise ValueError(f"min_pixels ({self.min_pixels}) exceeds max_pixels ({self.max_pixels})")
        if self.video_min_pixels > self.video_max_pixels:
            raise ValueError(f"video_min_pixels ({self.video_min_pixels}) exceeds video_max_pixels "
                             f"({self.video_max_pixels})")
        for name in ("video_fps", "video_sample_fps"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if not 0.0 <= self.jpeg_prob <= 1.0:
            raise ValueError(f"jpeg_prob must be in [0, 1], got {self.jpeg_prob}")
        q = self.jpeg_quality
        if len(q) != 2 or not all(isinstance(x, int) for x in q) or not 1 <= q[0] <= q[1] <= 100:
            raise ValueError(f"jpeg_quality must be (low, high) ints with 1 <= low <= high <= 100, got {q}")
        if isinstance(self.prefetch, bool) or not isinstance(self.prefetch, int) or self.prefetch < 0:
            raise ValueError(f"prefetch must be an int >= 0, got {self.prefetch!r}")
        if isinstance(self.max_consecutive_skips, bool) or not isinstance(self.max_consecutive_skips, int) \
                or self.max_consecutive_skips < 0:
            raise ValueError(f"max_consecutive_skips must be an int >= 0, got {self.max_consecutive_skips!r}")
        for name in ("max_images_per_pack", "max_samples_per_pack", "epochs"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be None or a positive int, got {value!r}")
        if not 0.0 <= self.min_pack_fill <= 1.0:
            raise ValueError(f"min_pack_fill must be in [0, 1], got {self.min_pack_fill}")
        if not isinstance(self.preference, bool):
            raise ValueError(f"preference must be true or false, got {self.preference!r}")
        _choice(self, "loss_reweighting", LOSS_REWEIGHTING)
        _choice(self, "decode_device", DECODE_DEVICES)
        _choice(self, "decoder", DECODERS)
        _choice(self, "resize_backend", RESIZE_BACKENDS)
        if self.decoder == "pil" and self.resize_backend == "dali":
            raise ValueError("resize_backend='dali' needs decoder='dali' (or 'auto')")

    @classmethod
    def from_dict(cls, values: dict) -> "DataConfig":
        """Build from a mapping (e.g. a YAML section); an unknown key is an error naming the nearest field."""
        names = [f.name for f in dataclasses.fields(cls)]
        for key in values:
            if key not in names:
                near = difflib.get_close_matches(key, names, n=1)
                hint = f"; did you mean {near[0]!r}?" if near else ""
                raise ValueError(f"unknown DataConfig key {key!r}{hint}")
        return cls(**values)

    @classmethod
    def from_yaml(cls, path: str) -> "DataConfig":
        """Read a YAML file holding DataConfig keys at the top level or under a ``data:`` section."""
        import yaml

        with open(path) as f:
            values = yaml.safe_load(f) or {}
        if not isinstance(values, dict):
            raise ValueError(f"{path}: expected a mapping of DataConfig keys")
        if "data" in values and isinstance(values["data"], dict):
            values = values["data"]
        return cls.from_dict(values)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


DATASET_KEYS = ("path", "weight", "name")


def _check_datasets(entries) -> list[dict]:
    """data.datasets normalised to [{"path", "weight" (float), "name"}]; errors name the entry."""
    if not isinstance(entries, (list, tuple)) or not entries:
        raise ValueError(f"datasets must be a non-empty list of {{path, weight, name}} mappings, got {entries!r}")
    out, names = [], {}
    for i, entry in enumerate(entries):
        where = f"datasets[{i}]"
        if not isinstance(entry, dict):
            raise ValueError(f"{where} must be a mapping with keys {DATASET_KEYS}, got {entry!r}")
        for key in entry:
            if key not in DATASET_KEYS:
                near = difflib.get_close_matches(str(key), DATASET_KEYS, n=1)
                raise ValueError(f"{where}: unknown key {key!r}" + (f"; did you mean {near[0]!r}?" if near else ""))
        path = entry.get("path")
        paths = [path] if isinstance(path, str) else path
        if not paths or not isinstance(paths, (list, tuple)) or not all(isinstance(p, str) and p for p in paths):
            raise ValueError(f"{where}: path must be a directory, glob or file (or a list of them), got {path!r}")
        for p in paths:
            p = os.path.expanduser(p)
            if not (glob.glob(p) if any(ch in p for ch in "*?[") else os.path.exists(p)):
                raise ValueError(f"{where}: path {p!r} does not exist")
        weight = entry.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 < weight < float("inf"):
            raise ValueError(f"{where}: weight must be a number > 0, got {weight!r}")
        name = entry.get("name", os.path.basename(str(paths[0]).rstrip("/")) if len(paths) == 1 else None)
        if not isinstance(name, str) or not name:
            raise ValueError(f"{where}: name must be a non-empty string (required when path is a list), got {name!r}")
        if name in names:
            raise ValueError(f"{where}: name {name!r} is already used by datasets[{names[name]}]")
        names[name] = i
        out.append({"path": path if isinstance(path, str) else list(paths), "weight": float(weight), "name": name})
    return out


def _positive(cfg, *names):
    for name in names:
        value = getattr(cfg, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")


def _choice(cfg, name, choices):
    if getattr(cfg, name) not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {getattr(cfg, name)!r}")


def find_tokenizer(data_path: str) -> str | None:
    """A ``tokenizer`` directory inside, next to or above a shard directory (the synthetic dataset's layout)."""
    base = data_path if os.path.isdir(data_path) else os.path.dirname(data_path)
    for candidate in (os.path.join(base, "tokenizer"), os.path.join(os.path.dirname(base.rstrip("/")), "tokenizer")):
        if os.path.isfile(os.path.join(candidate, "tokenizer_config.json")):
            return candidate
    return None


def tool_config(data: str | None = None, config: str | None = None, tokenizer: str | None = None,
                **overrides) -> DataConfig:
    """DataConfig for the command-line tools: a YAML file, then --data / --tokenizer, then other overrides."""
    values = DataConfig.from_yaml(config).to_dict() if config else {}
    if data:
        values["data_path"], values["datasets"] = data, None
    if tokenizer:
        values["tokenizer_dir"] = tokenizer
    if not values.get("data_path") and not values.get("datasets"):
        raise ValueError("no data: give --data or a --config with data_path or datasets")
    if not values.get("tokenizer_dir"):
        first = values["data_path"] or values["datasets"][0]["path"]
        first = first if isinstance(first, str) else first[0]
        found = find_tokenizer(first)
        if found is None:
            raise ValueError("no tokenizer: give --tokenizer DIR or a --config with tokenizer_dir")
        values["tokenizer_dir"] = found
    values.update({k: v for k, v in overrides.items() if v is not None})
    return DataConfig.from_dict(values)
