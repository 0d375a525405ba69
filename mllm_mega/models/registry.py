"""The model family registry: one :class:`FamilySpec` per family, the only way the rest of mllm_mega
(training, data, checkpoint tools) reaches a model family.

A family is chosen by a HF ``config.json`` (its ``architectures`` entry, else its ``model_type``) or by name
(``model.family`` / ``ModelArch.family``). Each family registers itself in its folder's ``__init__.py`` under
``mllm_mega/models/families/<name>/`` (found by walking that package, so adding a family edits no shared file),
as torchtitan's ``ModelSpec`` and Megatron-Bridge's ``register_bridge`` do.

What a spec holds, and who uses it:

===================== ============================================================================= ==========
field                 signature                                                                      used by
===================== ============================================================================= ==========
parse_hf_config       (config.json dict) -> arch (``arch.family == name``)                           all
build_stage           (arch, layout, *, kernels, params_dtype, recompute_vision, recompute_llm)       trainer,
                      -> this rank's pipeline stage (megatron parallel_state initialised)             tools
key_map               (arch) -> [(our key, [HF keys], kind)]: every parameter, TP=1/PP=1              tools
hf_to_ours/ours_to_hf (arch, get[, expected_shapes]) -> iterator of (key, tensor)                     tools
normalize_hf_key      (HF key) -> on-disk HF key (transformers 5 in-memory names accepted)            tools
hf_key_is_known       (HF key) -> bool: the tensor belongs to this kind of checkpoint                 tools
loader_options        (arch) -> build_train_loader kwargs (processor geometry, position-id function)   trainer
eval_options          (arch) -> build_eval_samples kwargs                                              train.py
pack_hf_batch         (arch, input_ids, attention_mask, grids..., pad_to_multiple) -> packed THD      verify
verify_inputs         (arch) -> {case name: HF processor-style inputs}                                verify
pack_flops            (arch, pack, multipliers) -> training FLOPs of the real tokens of one pack      trainer
module_groups         (model stage) -> {group: [parameters]}, groups among ``MODULE_GROUPS``          trainer
tiny_config           (**overrides) -> a tiny HF config.json dict                                      trainer
build_tiny_hf_model   (seed=, **kwargs) -> a random transformers model of the tiny config             tools
processor_config      (arch, data_cfg) -> preprocessor_config.json dict or None (text-only)           trainer
check_layout          (arch, layout): raise ValueError when the TP/PP layout does not fit the arch     tools
export_hf_config      (HF config dict, dtype) -> the config.json an HF export writes (None: generic)   tools
graft_hf_config       (vision-donor config, LLM-donor config) -> the grafted config.json (or None)   tools
hf_code_files         (arch) -> paths of remote-code files an HF export copies next to config.json    tools
                      (the modules its ``auto_map`` names; None: transformers has the class)
compose_hf            (vision_from, llm_from, out, **options) -> summary: a new HF directory of this   tools
                      family from a vision-tower donor and an LLM donor (None: not composable)
has_vision            False for text-only LLM families (no image processor, no vision inputs)         all
groups                the module groups (of ``MODULE_GROUPS``) the family has                         trainer
===================== ============================================================================= ==========

Fields are plain callables; a registration module wraps them with :func:`lazy` so that looking a family up
imports neither torch nor megatron.
"""
from __future__ import annotations

import importlib
import json
import os
import pkgutil
from dataclasses import dataclass
from typing import Any, Callable

# The module groups freezing and LR multipliers act on (config: stage.freeze_<group>, stage.lr_mult_<group>),
# in forward order: a family names the ones it has (a text-only LLM has only "llm").
MODULE_GROUPS = ("vision", "merger", "llm")


@dataclass(frozen=True)
class FamilySpec:
    """Everything the rest of the system needs of one model family (see the module docstring)."""

    name: str
    hf_architectures: tuple[str, ...]
    hf_model_types: tuple[str, ...]
    parse_hf_config: Callable[[dict], Any]
    build_stage: Callable[..., Any]
    key_map: Callable[[Any], list]
    hf_to_ours: Callable[..., Any]
    ours_to_hf: Callable[..., Any]
    normalize_hf_key: Callable[[str], str]
    hf_key_is_known: Callable[[str], bool]
    loader_options: Callable[[Any], dict]
    eval_options: Callable[[Any], dict]
    pack_hf_batch: Callable[..., Any]
    verify_inputs: Callable[[Any], dict]
    pack_flops: Callable[[Any, dict, dict], float]
    module_groups: Callable[[Any], dict]
    tiny_config: Callable[..., dict]
    build_tiny_hf_model: Callable[..., Any]
    processor_config: Callable[[Any, Any], dict | None]
    check_layout: Callable[[Any, Any], Any]
    graft_hf_config: Callable[[dict, dict], dict] | None = None  # None: the family cannot be grafted
    export_hf_config: Callable[[dict, Any], dict] | None = None  # None: the generic writer's (dtype fields set)
    hf_code_files: Callable[[Any], list] | None = None  # None: no remote code (a transformers class)
    compose_hf: Callable[..., dict] | None = None  # None: the family is not composed from two donors
    has_vision: bool = True
    groups: tuple[str, ...] = MODULE_GROUPS  # the module groups this family has, in forward order


_FAMILIES: dict[str, FamilySpec] = {}
_LOADED = False


def lazy(target: str) -> Callable:
    """A callable that imports ``"package.module:function"`` on first call (keeps registration cheap)."""
    module_name, attr = target.split(":")
    cache: list = []

    def call(*args, **kwargs):
        if not cache:
            cache.append(getattr(importlib.import_module(module_name), attr))
        return cache[0](*args, **kwargs)

    call.__name__ = call.__qualname__ = attr
    call.__doc__ = f"lazily imported {target}"
    return call


def register(spec: FamilySpec) -> FamilySpec:
    """Add a family; its name and HF architectures must not be taken by another family."""
    old = _FAMILIES.get(spec.name)
    if old is not None and old is not spec:
        raise ValueError(f"model family {spec.name!r} is registered twice")
    for other in _FAMILIES.values():
        if other.name != spec.name and set(other.hf_architectures) & set(spec.hf_architectures):
            raise ValueError(f"families {other.name!r} and {spec.name!r} both claim HF architectures "
                             f"{sorted(set(other.hf_architectures) & set(spec.hf_architectures))}")
    _FAMILIES[spec.name] = spec
    return spec


def _load() -> None:
    """Import every ``mllm_mega.models.families.<name>`` package once (each registers its spec)."""
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    import mllm_mega.models.families as pkg

    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda i: i.name):
        if info.ispkg:
            importlib.import_module(f"{pkg.__name__}.{info.name}")


def names() -> list[str]:
    """Registered family names, sorted."""
    _load()
    return sorted(_FAMILIES)


def get(name: str) -> FamilySpec:
    """The spec of family ``name``; a ValueError lists the registered ones."""
    _load()
    if name not in _FAMILIES:
        raise ValueError(f"unknown model family {name!r}; registered: {sorted(_FAMILIES)}")
    return _FAMILIES[name]


def spec_of(arch) -> FamilySpec:
    """The spec of a parsed architecture (anything with a ``family`` attribute)."""
    return get(arch.family)


def family_of_hf_config(cfg: dict) -> FamilySpec:
    """The family a HF config.json dict belongs to: by ``architectures``, else ``model_type``."""
    _load()
    archs = cfg.get("architectures") or []
    for spec in _FAMILIES.values():
        if any(a in spec.hf_architectures for a in archs):
            return spec
    if not archs:
        for spec in _FAMILIES.values():
            if cfg.get("model_type") in spec.hf_model_types:
                return spec
    known = sorted(a for s in _FAMILIES.values() for a in s.hf_architectures)
    raise ValueError(f"config.json: unsupported architecture {archs or cfg.get('model_type')!r}; "
                     f"supported: {known}")


def arch_from_hf_config(cfg: dict):
    """Parse a HF config.json dict with its family's parser."""
    return family_of_hf_config(cfg).parse_hf_config(cfg)


def read_hf_config(hf_dir: str) -> dict:
    """``hf_dir/config.json`` as a dict, with errors naming the file."""
    path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no config.json (is {hf_dir!r} a HF model directory?)")
    with open(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None


def load_arch(hf_dir: str):
    """The parsed architecture of a HF model directory."""
    return arch_from_hf_config(read_hf_config(hf_dir))


def loader_options_of(hf_dir: str, *, train: bool = True) -> dict:
    """What the trainer passes ``build_train_loader`` (``train``) or ``build_eval_samples`` for a model
    directory's family: its image scheme (dynamic / fixed resolution), merge size, position-id function. The
    data tools' ``--model`` counts and cuts images as that model's training run does."""
    arch = load_arch(hf_dir)
    spec = spec_of(arch)
    return spec.loader_options(arch) if train else spec.eval_options(arch)


def composable_names() -> list[str]:
    """Families whose spec can compose a model from a vision donor and an LLM donor (``compose_hf``)."""
    return [n for n in names() if _FAMILIES[n].compose_hf is not None]


def tiny_arch_names() -> list[str]:
    """``tiny_<family>`` for every registered family: the values ``model.arch`` accepts besides a HF config."""
    return [f"tiny_{n}" for n in names()]
