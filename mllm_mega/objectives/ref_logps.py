"""The reference log-prob file: per-pair sums of the frozen reference model, precomputed once.

A preference objective (DPO, MPO) needs log pi_ref(y | x) for each pair's chosen and rejected completion.
``tools/precompute_ref_logps.py`` computes them in one forward-only pass and writes this file next to the
data, so training holds only the policy. Format (JSON, version 1)::

    {"format": "mllm_mega.ref_logps", "version": 1,
     "meta": {"reference": {...}, "data": {...}, "layout": {...}, "kernels": ..., "dtype": ..., ...},
     "logps": {"<sample key>": [chosen, rejected], ...}}

Values are the float64 of the fp32 sums, written with Python's ``repr`` (shortest round-trip form), so a
read gives back exactly the float that was written. ``meta`` says what produced the numbers: the
reference checkpoint (path, iteration, digest of its integrity manifest, family; a moved checkpoint still
matches by its digest), the data (``data_fingerprint``), the layout and the
kernels; ``check_ref_logps_meta`` is how the training side refuses a file made for another checkpoint or
another data set. Writes go to a temporary name and are renamed when complete.
"""
from __future__ import annotations

import hashlib
import json
import math
import os

import torch

FORMAT = "mllm_mega.ref_logps"
VERSION = 1
REQUIRED_META = ("reference", "data", "layout", "kernels", "dtype")
_PROBE = 1 << 20  # bytes hashed at each end of a shard: a cheap identity that needs no full read


def default_ref_logps_path(data_dir: str, name: str = "ref") -> str:
    """``<data dir>/ref_logps.<name>.json``: where the tool writes and the trainer looks by default."""
    if not name or os.sep in name or name.startswith("."):
        raise ValueError(f"ref_logps name {name!r} must be a plain file-name part")
    return os.path.join(data_dir, f"ref_logps.{name}.json")


def data_fingerprint(shards: list[str]) -> dict:
    """What the data side must agree on: each shard's name, size and sha256 of its first and last MiB."""
    out = []
    for path in shards:
        size = os.path.getsize(path)
        h = hashlib.sha256()
        with open(path, "rb") as f:
            h.update(f.read(_PROBE))
            if size > _PROBE:
                f.seek(max(size - _PROBE, _PROBE))
                h.update(f.read(_PROBE))
        out.append([os.path.basename(path), size, h.hexdigest()])
    return {"shards": out}


def write_ref_logps(path: str, mapping: dict, meta: dict) -> None:
    """Write ``{key: (chosen, rejected)}`` with ``meta`` to ``path`` atomically (tmp + rename)."""
    missing = [k for k in REQUIRED_META if k not in meta]
    if missing:
        raise ValueError(f"write_ref_logps({path}): meta lacks {missing} (needs {list(REQUIRED_META)})")
    logps = {}
    for key, value in mapping.items():
        if not isinstance(key, str) or not key:
            raise ValueError(f"write_ref_logps({path}): sample key {key!r} must be a non-empty string")
        try:
            chosen, rejected = (float(v) for v in value)
        except (TypeError, ValueError):
            raise ValueError(f"write_ref_logps({path}): value of key {key!r} must be (chosen, rejected), "
                             f"got {value!r}") from None
        if not (math.isfinite(chosen) and math.isfinite(rejected)):
            raise ValueError(f"write_ref_logps({path}): key {key!r} has a non-finite log-prob {value!r}")
        logps[key] = [chosen, rejected]
    doc = {"format": FORMAT, "version": VERSION, "meta": {**meta, "num_pairs": len(logps)}, "logps": logps}
    text = json.dumps(doc, indent=None, separators=(",", ":"), allow_nan=False)  # json writes float repr
    from mllm_mega.training.checkpointing import atomic_write_text

    atomic_write_text(path, text)  # temporary name, renamed when complete: nothing half-written is left behind


def read_ref_logps(path: str) -> tuple[dict, dict]:
    """-> (``{key: (chosen, rejected)}`` as floats, meta). Errors name the file and the bad key."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"reference log-prob file {path} does not exist "
                                f"(make it with tools/precompute_ref_logps.py)")
    try:
        with open(path) as f:
            doc = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not a reference log-prob file ({e})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ValueError(f"{path}: not a reference log-prob file (format {doc.get('format') if isinstance(doc, dict) else None!r})")
    if doc.get("version") != VERSION:
        raise ValueError(f"{path}: version {doc.get('version')!r}, this reader reads {VERSION}")
    meta, logps = doc.get("meta"), doc.get("logps")
    if not isinstance(meta, dict) or not isinstance(logps, dict):
        raise ValueError(f"{path}: 'meta' and 'logps' must be objects")
    mapping = {}
    for key, value in logps.items():
        if (not isinstance(value, list) or len(value) != 2
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)):
            raise ValueError(f"{path}: key {key!r} must map to [chosen, rejected], got {value!r}")
        mapping[key] = (float(value[0]), float(value[1]))
    if meta.get("num_pairs") != len(mapping):
        raise ValueError(f"{path}: meta says {meta.get('num_pairs')} pairs, the file holds {len(mapping)}")
    return mapping, meta


def check_ref_logps_meta(path: str, meta: dict, expected: dict) -> None:
    """Refuse a file whose meta disagrees with ``expected`` (e.g. {"reference": ..., "data": ...}) on any key
    given; the error names the key and both values."""
    for key, want in expected.items():
        have = meta.get(key)
        if json.loads(json.dumps(have)) != json.loads(json.dumps(want)):  # compare as JSON (tuples == lists)
            raise ValueError(f"{path}: made with {key}={have!r}, this run has {key}={want!r}; "
                             f"recompute it with tools/precompute_ref_logps.py")


def lookup_ref_logps(path: str, mapping: dict, keys: list[str]) -> list[tuple[float, float]]:
    """The (chosen, rejected) of each key; a key the file lacks is an error naming it and the file."""
    out = []
    for key in keys:
        if key not in mapping:
            raise KeyError(f"{path}: no reference log-probs for sample key {key!r} ({len(mapping)} keys in the "
                           f"file; was it made from this data?)")
        out.append(mapping[key])
    return out


# ---- the precompute pass ----------------------------------------------------------------------------
_MODEL_INPUTS = ("input_ids", "position_ids", "cu_seqlens", "pixel_values", "image_grid_thw", "pixel_values_videos",
                 "video_grid_thw", "image_feature_index", "video_feature_index")


def load_reference_model(load: str, *, tp: int = 1, pp: int = 1, kernels: str = "torch",
                         num_llm_layers_in_first_stage: int | None = None, dtype: torch.dtype = torch.float32):
    """(model stage in eval mode, arch) of checkpoint ``load`` at TP x PP; initialises the process groups."""
    from mllm_mega.models import registry
    from mllm_mega.models.layout import ParallelLayout
    from mllm_mega.parallel.initialize import initialize_distributed
    from mllm_mega.training import checkpointing as ckpt

    arch = registry.arch_from_hf_config(ckpt.read_meta(load)["hf_config"])
    initialize_distributed(tp, pp, num_llm_layers_in_first_stage=num_llm_layers_in_first_stage)
    layout = ParallelLayout(tp, pp, num_llm_layers_in_first_stage=num_llm_layers_in_first_stage)
    model = registry.spec_of(arch).build_stage(arch, layout, kernels=kernels, params_dtype=dtype)
    if torch.cuda.is_available():
        model = model.cuda()
    ckpt.load_model_weights(load, model)
    return model.eval(), arch


def pack_pair_logps(segment_sums, pack: dict) -> dict:
    """{pair key: (chosen, rejected)} of one pack from its per-segment sums (S,) and ``pair_segments`` (P, 2)."""
    pairs, keys = pack.get("pair_segments"), pack.get("pair_keys")
    if pairs is None or keys is None:
        raise ValueError("a preference pack needs 'pair_segments' (P, 2) and 'pair_keys' (P keys); got keys "
                         f"{sorted(pack)}")
    pairs = torch.as_tensor(pairs)
    if pairs.dim() != 2 or pairs.shape[1] != 2 or pairs.shape[0] != len(keys):
        raise ValueError(f"pair_segments must be (P, 2) with P = len(pair_keys) = {len(keys)}, got "
                         f"{tuple(pairs.shape)}")
    num_segments = segment_sums.shape[0]
    if pairs.numel() and (int(pairs.min()) < 0 or int(pairs.max()) >= num_segments):
        raise ValueError(f"pair_segments {pairs.tolist()} index outside the pack's {num_segments} segments")
    sums = segment_sums.detach().double().cpu()
    return {k: (float(sums[c]), float(sums[r])) for k, (c, r) in zip(keys, pairs.tolist())}


def precompute_ref_logps(model, packs, *, kernels: str = "torch", progress: bool = True, total=None) -> dict:
    """Collective over the world: forward-only every pack of this data-parallel rank through ``model``
    (a pipeline stage at any TP/PP, in eval mode), sum each segment's completion log-probs and return
    ``{pair key: (chosen, rejected)}`` of every DP rank's pairs, on every rank.

    Each pack is a collated preference pack (input_ids, position_ids, cu_seqlens, labels, media, pair_segments,
    pair_keys); every rank of one TP x PP group must be given the same packs. A key seen twice is an error.
    """
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from tqdm import tqdm

    from mllm_mega.objectives.logprobs import segment_logps
    from mllm_mega.parallel.schedule import forward_only

    tp_group = ps.get_tensor_model_parallel_group() if ps.get_tensor_model_parallel_world_size() > 1 else None
    writer = ps.is_pipeline_last_stage(ignore_virtual=True) and ps.get_tensor_model_parallel_rank() == 0
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    local: dict = {}
    duplicates: list = []
    show = progress and dist.get_rank() == 0
    for pack in tqdm(packs, total=total, desc="ref log-probs", unit="pack", disable=not show):
        batch = {k: pack[k].to(device) for k in _MODEL_INPUTS if pack.get(k) is not None}
        with torch.no_grad():
            logits = forward_only(model, batch, batch["input_ids"].shape[0])
        if not ps.is_pipeline_last_stage(ignore_virtual=True):
            continue
        sums = segment_logps(logits, pack["labels"].to(device), pack["cu_seqlens"].to(device), kernels=kernels,
                             tp_group=tp_group)
        if writer:
            for key, value in pack_pair_logps(sums, pack).items():
                if key in local:
                    duplicates.append(key)
                local[key] = value
    # a duplicated key is reported after the gather, on every rank (raising mid-loop would hang the others)
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (local, duplicates))
    merged: dict = {}
    for part, dups in gathered:
        if dups:
            raise ValueError(f"sample key {dups[0]!r} appears twice in the data (keys must be unique)")
        for key, value in part.items():
            if key in merged:
                raise ValueError(f"sample key {key!r} was read by two data-parallel ranks (keys must be unique)")
            merged[key] = value
    return merged


def reference_meta(load: str) -> dict:
    """How a file names its reference checkpoint: absolute path, tracked iteration (None for an import) and
    ``content``, the sha256 of that iteration's integrity manifest (every file's size and hash; None when it
    has none), which identifies the weights wherever the directory is moved or copied."""
    from mllm_mega.training.checkpointing import iter_dir, read_tracker
    from mllm_mega.training.integrity import MANIFEST

    iteration = read_tracker(load)[0]
    content = None
    if iteration is not None and os.path.isfile(os.path.join(iter_dir(load, iteration), MANIFEST)):
        with open(os.path.join(iter_dir(load, iteration), MANIFEST), "rb") as f:
            content = "sha256:" + hashlib.sha256(f.read()).hexdigest()
    return {"load": os.path.abspath(load), "iteration": iteration, "content": content}


def _reference_identity(meta) -> dict:
    """What must agree between a file's reference and the run's: the content digest and iteration when both
    sides have a digest, else the path and iteration."""
    meta = meta if isinstance(meta, dict) else {}
    if meta.get("content"):
        return {"iteration": meta.get("iteration"), "content": meta["content"]}
    return {"load": meta.get("load"), "iteration": meta.get("iteration")}


def data_shards(data_cfg) -> list[str]:
    """The shards of ``data.data_path`` or of every ``data.datasets`` entry, in the loader's order."""
    from mllm_mega.data.shards import list_shards

    if data_cfg.datasets:
        return [s for d in data_cfg.datasets for s in list_shards(d["path"])]
    return list_shards(data_cfg.data_path)


def open_ref_logps(path: str, *, load: str | None, data_cfg) -> dict:
    """The training side: ``{pair key: (chosen, rejected)}`` of ``path`` after checking it was made from
    reference checkpoint ``load`` (skipped when None) and from ``data_cfg``'s shards; a mismatch is a
    ValueError naming the file, the key and both values."""
    mapping, meta = read_ref_logps(path)
    if load is not None:
        want, have = reference_meta(load), meta.get("reference")
        if _reference_identity(have) != _reference_identity(want):
            raise ValueError(f"{path}: made with reference={have!r}, this run has reference={want!r}; "
                             f"recompute it with tools/precompute_ref_logps.py")
    check_ref_logps_meta(path, meta, {"data": data_fingerprint(data_shards(data_cfg))})
    return mapping


def precompute_to_file(cfg, *, load: str, tp: int, pp: int, out: str | None = None, name: str = "ref",
                       kernels: str | None = None, progress: bool = True) -> tuple[str, int, dict]:
    """Collective: one pass over ``cfg.data`` (preference pairs, one epoch, this rank's DP share) through the
    reference checkpoint ``load`` at TP x PP (DP = the rest of the world); rank 0 writes the file.

    Returns (path, number of pairs written, skipped-sample counts summed over DP ranks)."""
    shards = data_shards(cfg.data)  # bad paths fail here, before the heavy imports
    path = out or default_ref_logps_path(os.path.dirname(os.path.abspath(shards[0])), name)
    if not os.path.isdir(os.path.dirname(os.path.abspath(path))):
        raise FileNotFoundError(f"output {path!r}: its directory does not exist")
    import dataclasses

    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from mllm_mega.data.loader import build_train_loader
    from mllm_mega.models import registry
    from mllm_mega.training.setup import resolve_dtype

    kernels = kernels or cfg.model.kernels
    dtype = resolve_dtype(cfg)
    model, arch = load_reference_model(load, tp=tp, pp=pp, kernels=kernels, dtype=dtype,
                                       num_llm_layers_in_first_stage=cfg.parallel.num_llm_layers_in_first_stage)
    data_cfg = dataclasses.replace(cfg.data, preference=True, epochs=1)  # every pair exactly once
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    loader = build_train_loader(data_cfg, dp_rank=dp_rank, dp_size=dp, **registry.spec_of(arch).loader_options(arch))
    try:
        mapping = precompute_ref_logps(model, loader, kernels=kernels, progress=progress)
        skipped = [None] * dist.get_world_size()
        dist.all_gather_object(skipped, dict(loader.skip_counts) if ps.get_tensor_model_parallel_rank() == 0
                               and ps.get_pipeline_model_parallel_rank() == 0 else {})
    finally:
        loader.close()
    skips: dict = {}
    for part in skipped:
        for reason, n in part.items():
            skips[reason] = skips.get(reason, 0) + int(n)
    meta = {"reference": reference_meta(load), "data": data_fingerprint(shards), "family": arch.family,
            "layout": {"tp": tp, "pp": pp, "dp": dp}, "kernels": kernels,
            "dtype": str(dtype).replace("torch.", ""), "seq_len": cfg.data.seq_len, "skipped": skips}
    if dist.get_rank() == 0:
        write_ref_logps(path, mapping, meta)
    dist.barrier()
    return path, len(mapping), skips
