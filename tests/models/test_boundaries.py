"""Architecture boundary: outside ``mllm_mega/models/`` (training, data, checkpoint tools, ``tools/``) a model
family is reached only through ``mllm_mega.models.registry``.

Fails when a module there imports a family package (``mllm_mega.models.families.*`` or a family's
implementation package such as ``mllm_mega.models.qwen2_vl``), names one in a string (lazy imports,
``python -m``), or compares against / matches on a registered family name. AST only: nothing is imported
but the registry.
"""
from __future__ import annotations

import ast
import pathlib

import pytest

from mllm_mega.models import registry

ROOT = pathlib.Path(__file__).resolve().parents[2]
# the family-independent parts of mllm_mega.models that the rest of the system may use
ALLOWED = ("registry", "layout", "positions", "common", "vlm", "encoders", "projectors", "llms")


def _module_name(path: pathlib.Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts)


def _resolve(node: ast.ImportFrom, module: str) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".")[: -node.level]
    return ".".join(base + ([node.module] if node.module else []))


def _forbidden_module(name: str) -> bool:
    parts = name.split(".")
    return parts[:2] == ["mllm_mega", "models"] and len(parts) > 2 and parts[2] not in ALLOWED


def _strs(node) -> list[str]:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return [s for e in node.elts for s in _strs(e)]
    return []


def violations(source: str, module: str, families: set[str]) -> list[str]:
    """Every boundary violation in ``source`` (the text of module ``module``), as 'line: what'."""
    out = []
    for node in ast.walk(ast.parse(source)):
        line = getattr(node, "lineno", 0)
        if isinstance(node, ast.Import):
            out += [f"{line}: import {a.name}" for a in node.names if _forbidden_module(a.name)]
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(node, module)
            if _forbidden_module(base):
                out.append(f"{line}: from {base} import ...")
            elif base == "mllm_mega.models":
                out += [f"{line}: from mllm_mega.models import {a.name}" for a in node.names
                        if a.name not in ALLOWED]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            if _forbidden_module(node.value.split(":")[0]) and " " not in node.value:
                out.append(f"{line}: string {node.value!r} names a family package")
        elif isinstance(node, ast.Compare):
            names = [s for operand in (node.left, *node.comparators) for s in _strs(operand) if s in families]
            if names:
                out.append(f"{line}: compares against family name(s) {names}")
        elif isinstance(node, ast.match_case):
            names = [s for sub in ast.walk(node.pattern) if isinstance(sub, ast.MatchValue)
                     for s in _strs(sub.value) if s in families]
            if names:
                out.append(f"{line}: matches on family name(s) {names}")
    return out


def _outside_files() -> list[pathlib.Path]:
    files = [p for p in (ROOT / "mllm_mega").rglob("*.py") if "models" not in p.relative_to(ROOT).parts[1:2]]
    return sorted(files + list((ROOT / "tools").rglob("*.py")))


def test_checker_catches_the_old_patterns():
    fams = set(registry.names())
    assert {"qwen2_vl", "qwen2_5_vl"} <= fams
    bad = {
        "from mllm_mega.models.qwen2_vl.model import build_model": "import",
        "import mllm_mega.models.families.qwen2_vl": "import",
        "from mllm_mega.models import qwen2_vl": "import",
        "from ..models.qwen2_vl.spec import resolve_kernels": "import",
        "f = lazy('mllm_mega.models.qwen2_vl.flops:pack_flops')": "string",
        "x = 1 if arch.family == 'qwen2_5_vl' else 0": "compares",
        "if family in ('qwen2_vl', 'other'):\n    pass": "compares",
        "match family:\n    case 'qwen2_5_vl':\n        pass": "matches",
    }
    for src, kind in bad.items():
        found = violations(src, "mllm_mega.training.trainer", fams)
        assert len(found) == 1 and kind in found[0], (src, found)
    good = ("from mllm_mega.models import registry\nfrom mllm_mega.models.layout import ParallelLayout\n"
            "spec = registry.get(cfg.family)\nif spec.has_vision:\n    pass\n"
            "import transformers.models.qwen2_5_vl\nCONFIG = 'examples/configs/gpu_check_qwen2_5_vl_1b.yaml'\n")
    assert violations(good, "mllm_mega.training.trainer", fams) == []


def test_no_module_outside_models_reaches_a_family_directly():
    fams = set(registry.names())
    files = _outside_files()
    assert any(p.name == "trainer.py" for p in files) and any(p.name == "convert_checkpoint.py" for p in files)
    bad = {str(p.relative_to(ROOT)): v for p in files
           if (v := violations(p.read_text(), _module_name(p), fams))}
    assert not bad, "family reached outside mllm_mega/models (use mllm_mega.models.registry):\n" + "\n".join(
        f"  {f}:{v}" for f, vs in bad.items() for v in vs)


@pytest.mark.parametrize("name", ["qwen2_vl", "qwen2_5_vl", "valley"])
def test_families_found_by_hf_config(name):
    spec = registry.get(name)
    cfg = spec.tiny_config()
    assert registry.family_of_hf_config(cfg) is spec
    assert registry.family_of_hf_config({"model_type": spec.hf_model_types[0]}) is spec
    assert registry.arch_from_hf_config(cfg).family == name
    with pytest.raises(ValueError, match="unsupported architecture"):
        registry.family_of_hf_config({"architectures": ["NoSuchModel"]})
