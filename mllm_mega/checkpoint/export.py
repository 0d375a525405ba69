"""Export mllm_mega checkpoints to HF directories, re-save them at another TP/PP, and check round trips.

* :func:`export_hf` - checkpoint (any saved TP/PP) -> HF directory that ``transformers`` loads
  (``AutoModelForImageTextToText`` / ``Qwen2(_5)VLForConditionalGeneration``): ``config.json``,
  ``generation_config.json``, ``model-0000i-of-0000n.safetensors`` + ``model.safetensors.index.json`` (always the
  sharded layout, even for one shard) and the tokenizer/processor files of ``ROOT/hf_extra``.
* :func:`reshard` - collective (run under torchrun): load at TP/PP and save again, i.e. a checkpoint written by
  a run at that layout.
* :func:`roundtrip` - import -> [reshard] -> export, then every tensor compared with the source (bit-identical in
  the source dtype: import keeps fp32, which holds bf16/fp16 values exactly).
"""
from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

import torch
import torch.distributed as dist
from tqdm import tqdm

from mllm_mega.checkpoint.io import (
    check_out, copy_hf_extra, load_full_model, parse_dtype, rank, resolve_checkpoint, staged_output,
    tensor_state,
)
from mllm_mega.models import registry
from mllm_mega.models.layout import ParallelLayout
from mllm_mega.checkpoint.hf_io import parse_size  # noqa: F401 (part of this module's API)
from mllm_mega.training import checkpointing as ckpt

def _export_config(hf_config: dict, dtype: torch.dtype) -> dict:
    """The HF config with its dtype fields set to the export dtype."""
    cfg = copy.deepcopy(hf_config)
    name = str(dtype).replace("torch.", "")
    for sub in (cfg, cfg.get("text_config"), cfg.get("vision_config")):
        if isinstance(sub, dict):
            for key in ("dtype", "torch_dtype"):
                if key in sub:
                    sub[key] = name
    if "dtype" not in cfg and "torch_dtype" not in cfg:
        cfg["dtype"] = name
    return cfg


def _generation_config(hf_config: dict) -> dict:
    """A minimal generation_config.json from the model config's special token ids."""
    text = hf_config.get("text_config") or {}
    out = {}
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = hf_config.get(key, text.get(key))
        if value is not None:
            out[key] = value
    return out


def write_hf_weights(out_dir: str, tensors, max_shard_bytes: int, dtype: torch.dtype, *, total: int | None = None,
                     progress: bool = True) -> dict:
    """Write (HF key, tensor) pairs as ``model-0000i-of-0000n.safetensors`` + index; returns the index dict.

    A shard is closed when the next tensor would take it over ``max_shard_bytes``; a larger tensor gets a shard
    of its own. Shards are written under provisional names and renamed once their count is known.
    """
    from safetensors.torch import save_file

    shards: list[list[str]] = []
    weight_map: dict[str, str] = {}
    current: dict[str, torch.Tensor] = {}
    current_bytes = total_bytes = total_params = 0

    def flush():
        nonlocal current, current_bytes
        if current:
            save_file(current, os.path.join(out_dir, f".shard-{len(shards):05d}"), metadata={"format": "pt"})
            shards.append(sorted(current))
            current, current_bytes = {}, 0

    for key, t in tqdm(tensors, total=total, desc="export-hf", disable=not progress, unit="tensor"):
        t = t.detach().to(device="cpu", dtype=dtype, copy=True).contiguous()  # own storage (no shared views)
        size = t.numel() * t.element_size()
        if current and current_bytes + size > max_shard_bytes:
            flush()
        current[key] = t
        current_bytes += size
        total_bytes += size
        total_params += t.numel()
    flush()
    n = len(shards)
    for i, keys in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        os.replace(os.path.join(out_dir, f".shard-{i:05d}"), os.path.join(out_dir, name))
        weight_map.update({k: name for k in keys})
    index = {"metadata": {"total_size": total_bytes, "total_parameters": total_params},
             "weight_map": dict(sorted(weight_map.items()))}
    with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
        json.dump(index, f, indent=2)
    return index


def _is_model_file(name: str) -> bool:
    """config.json, weights and weight indexes: what an export writes itself, never taken from hf_extra."""
    return name == "config.json" or name.endswith((".safetensors", ".bin", ".pt", ".pth", ".index.json"))


def write_hf_dir(out_dir: str, arch, state: dict[str, torch.Tensor], *, dtype: torch.dtype,
                 max_shard_bytes: int, extra_from: str | None = None, progress: bool = True) -> dict:
    """Full state (our names) -> HF files in ``out_dir`` (which exists): weights, configs, hf_extra files."""
    spec = registry.spec_of(arch)
    num = sum(len(hf_keys) for _, hf_keys, _ in spec.key_map(arch))
    index = write_hf_weights(out_dir, spec.ours_to_hf(arch, state.__getitem__), max_shard_bytes, dtype, total=num,
                             progress=progress)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump((spec.export_hf_config or _export_config)(arch.hf_config, dtype), f, indent=2)
    for path in (spec.hf_code_files(arch) if spec.hf_code_files else []):  # remote code named by auto_map
        shutil.copyfile(path, os.path.join(out_dir, os.path.basename(path)))
    extra = os.path.join(extra_from, "hf_extra") if extra_from else None
    if extra and os.path.isdir(extra):
        for name in sorted(os.listdir(extra)):
            # never the model files of an HF dir used as data.tokenizer_dir (the trainer copies that whole dir):
            # they would replace the exported weights / index / config with the starting ones
            if os.path.isfile(os.path.join(extra, name)) and not _is_model_file(name):
                shutil.copy2(os.path.join(extra, name), os.path.join(out_dir, name))
    if not os.path.isfile(os.path.join(out_dir, "generation_config.json")):
        with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
            json.dump(_generation_config(arch.hf_config), f, indent=2)
    return index


def export_hf(load: str, out: str, *, dtype: str | None = None, max_shard_size: str = "5GB",
              progress: bool = True) -> dict:
    """Checkpoint at ``load`` (root or iter dir, saved at any TP/PP) -> HF directory ``out``.

    ``dtype`` defaults to the checkpoint's source dtype (``mllm_mega.json``). Everything is validated before
    anything is written; ``out`` appears only when complete. Returns the safetensors index.
    """
    ref = resolve_checkpoint(load, "--load")
    limit = parse_size(max_shard_size)
    target = parse_dtype(dtype or ref.meta.get("source_dtype") or "float32")
    check_out(out)
    spec = registry.spec_of(ref.arch)
    if spec.export_hf_config is not None:  # before any loading: it refuses an arch HF cannot express
        spec.export_hf_config(ref.arch.hf_config, target)
    state = tensor_state(load_full_model(ref))
    with staged_output(out, ".export-") as tmp:
        return write_hf_dir(tmp, ref.arch, state, dtype=target, max_shard_bytes=limit, extra_from=ref.root,
                            progress=progress)


# ---- re-save at another layout --------------------------------------------------------------------------
def reshard(load: str, out: str, *, tp: int = 1, pp: int = 1, num_llm_layers_in_first_stage: int | None = None,
            ) -> None:
    """Collective (torchrun with tp*pp ranks): load ``load`` at TP/PP and save it as a new checkpoint ``out``.

    The result is what a training run at that layout writes for the model (meta and hf_extra copied, same
    iteration). Temporary name, renamed by rank 0 when every rank has finished.
    """
    from mllm_mega.parallel.initialize import initialize_distributed

    ref = resolve_checkpoint(load, "--load")
    check_out(out)
    layout = ParallelLayout(tp, pp, num_llm_layers_in_first_stage=num_llm_layers_in_first_stage)
    initialize_distributed(tp, pp)
    model = registry.spec_of(ref.arch).build_stage(ref.arch, layout, kernels="torch")
    ckpt.load_model_weights(ref.iter_path, model)
    parent = os.path.dirname(os.path.abspath(out))
    if rank() == 0:
        os.makedirs(parent, exist_ok=True)
    box = [tempfile.mkdtemp(prefix=".reshard-", dir=parent) if rank() == 0 else None]
    if dist.is_initialized():
        dist.broadcast_object_list(box, src=0)
    tmp = box[0]
    try:
        ckpt.write_meta(tmp, ref.meta)
        ckpt.save_checkpoint(tmp, ref.iteration, ckpt.model_sharded_state_dict(model))
        if rank() == 0:
            copy_hf_extra(ref.root, tmp)
            if os.path.isdir(out):
                os.rmdir(out)
            os.replace(tmp, out)
        if dist.is_initialized():
            dist.barrier()
    except BaseException:
        if rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise


# ---- round trip ------------------------------------------------------------------------------------------
def compare_hf_dirs(src: str, dst: str) -> tuple[int, list[str]]:
    """Compare every tensor of two HF directories: (number compared, list of differences)."""
    from mllm_mega.checkpoint.hf_io import HFCheckpointReader

    a, b = HFCheckpointReader(src), HFCheckpointReader(dst)
    try:
        problems = []
        ka, kb = set(a.keys()), set(b.keys())
        problems += [f"{k}: only in {src}" for k in sorted(ka - kb)]
        problems += [f"{k}: only in {dst}" for k in sorted(kb - ka)]
        for k in sorted(ka & kb):
            x, y = a.get(k), b.get(k)
            if x.dtype != y.dtype:
                problems.append(f"{k}: dtype {x.dtype} vs {y.dtype}")
            elif x.shape != y.shape:
                problems.append(f"{k}: shape {tuple(x.shape)} vs {tuple(y.shape)}")
            elif not torch.equal(x, y):
                diff = (x.float() - y.float()).abs().max().item()
                problems.append(f"{k}: values differ (max abs diff {diff:.3e})")
        return len(ka & kb), problems
    finally:
        a.close()
        b.close()


def _run_reshard(load: str, out: str, tp: int, pp: int, first: int | None) -> None:
    """``reshard`` in a torchrun child with tp*pp ranks (gloo on CPU, NCCL on GPU)."""
    import mllm_mega

    pkg_parent = os.path.dirname(os.path.dirname(os.path.abspath(mllm_mega.__file__)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (pkg_parent, os.environ.get("PYTHONPATH")) if p)}
    env.setdefault("OMP_NUM_THREADS", "1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={tp * pp}",
           "-m", "mllm_mega.checkpoint.export", "--load", load, "--out", out, "--tp", str(tp), "--pp", str(pp)]
    if first is not None:
        cmd += ["--num-llm-layers-in-first-stage", str(first)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"reshard to TP={tp} PP={pp} failed (exit {res.returncode}):\n{res.stderr[-4000:]}")


def roundtrip(hf_dir: str, *, tp: int = 1, pp: int = 1, num_llm_layers_in_first_stage: int | None = None,
              max_shard_size: str = "5GB", workdir: str | None = None, keep: bool = False,
              progress: bool = True) -> dict:
    """import-hf -> (re-save at TP/PP when not 1/1) -> export-hf -> compare every tensor with ``hf_dir``.

    Returns {"tensors": n, "problems": [...], "dtype": source dtype, "exported": path (kept only with keep)}.
    """
    from mllm_mega.checkpoint.convert import import_hf
    from mllm_mega.checkpoint.hf_io import HFCheckpointReader

    reader = HFCheckpointReader(hf_dir)  # fail early, before anything is written
    reader.check_keys()
    src_dtype = reader.dtype()
    reader.close()
    # the layout must fit the architecture (heads, vocab, layers divisible)
    layout = ParallelLayout(tp, pp, num_llm_layers_in_first_stage=num_llm_layers_in_first_stage)
    registry.spec_of(reader.arch).check_layout(reader.arch, layout)
    parse_size(max_shard_size)
    if workdir:
        os.makedirs(workdir, exist_ok=True)
    work = tempfile.mkdtemp(prefix="roundtrip-", dir=workdir)
    try:
        ckpt_dir = os.path.join(work, "ckpt_tp1_pp1")
        import_hf(hf_dir, ckpt_dir, progress=progress)
        if tp * pp > 1:
            resaved = os.path.join(work, f"ckpt_tp{tp}_pp{pp}")
            _run_reshard(ckpt_dir, resaved, tp, pp, num_llm_layers_in_first_stage)
            ckpt_dir = resaved
        exported = os.path.join(work, "hf_export")
        export_hf(ckpt_dir, exported, max_shard_size=max_shard_size, progress=progress)
        n, problems = compare_hf_dirs(hf_dir, exported)
        return {"tensors": n, "problems": problems, "dtype": str(src_dtype).replace("torch.", ""),
                "exported": exported if keep else None, "workdir": work if keep else None}
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)


def _reshard_main(argv=None) -> int:
    """Entry of the torchrun child started by :func:`roundtrip` (the public CLI is ``convert_checkpoint.py``)."""
    import argparse

    p = argparse.ArgumentParser(description="re-save a checkpoint at TP/PP (collective)")
    p.add_argument("--load", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--num-llm-layers-in-first-stage", type=int, default=None)
    args = p.parse_args(argv)
    reshard(args.load, args.out, tp=args.tp, pp=args.pp,
            num_llm_layers_in_first_stage=args.num_llm_layers_in_first_stage)
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(_reshard_main())
