"""Smoke test of tools/bench_kernels.py on CPU: tiny shapes under the interpreter, one op."""
import importlib.util
import json
from pathlib import Path

import pytest
import torch

TOOL = Path(__file__).resolve().parents[2] / "tools" / "bench_kernels.py"


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU smoke test; on GPU the tool runs full-size shapes")
def test_bench_rmsnorm_cpu_banner_and_json(capsys):
    spec = importlib.util.spec_from_file_location("bench_kernels_under_test", TOOL)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.main(["--op", "rmsnorm", "--json"])
    out = capsys.readouterr().out
    assert "CPU / TRITON_INTERPRET: correctness-only, timings meaningless" in out
    assert "| mllm_mega rms_norm | fwd+bwd |" in out
    payload = json.loads(out.strip().splitlines()[-1])
    assert payload["cpu_interpreter"] is True
    ours = [r for r in payload["records"] if r["impl"] == "mllm_mega rms_norm"]
    assert {r["pass"] for r in ours} == {"fwd", "fwd+bwd"}
    # the tool's own cross-check: our output against HF's Qwen2RMSNorm (the first implementation), fp32
    assert all(r["err_vs_first"] is not None and r["err_vs_first"] < 1e-5 for r in ours)
