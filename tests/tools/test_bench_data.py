"""tools/bench_data.py --compare-hf: the same-work comparison against transformers' processors runs and reports
every column and ratio (tiny sizes; the measured table is in docs/benchmarks.md)."""
import json

import pytest
import torch

from tests.tools.conftest import load_tool


def test_compare_hf_reports_every_column(capsys):
    threads = torch.get_num_threads()
    try:
        load_tool("bench_data")(["--threads", "1", "--num-images", "2", "--size", "64", "48", "--compare-hf", "2"])
    finally:
        torch.set_num_threads(threads)  # the tool pins torch to --threads
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    cols = summary["ms_per_image"]
    assert {"decoded/ours", "decoded/hf-pil", "jpeg/ours-pil-decode", "jpeg/hf-pil"} <= set(cols)
    assert all(c["min"] <= c["median"] <= c["max"] and c["min"] > 0 for c in cols.values())
    ratios = summary["speed_vs_hf"]
    assert "decoded/ours vs decoded/hf-pil" in ratios and "jpeg/ours-pil-decode vs jpeg/hf-pil" in ratios
    assert summary["torch_threads"] == 1 and summary["torchvision"] is None


def test_torchvision_path_must_hold_the_package(tmp_path):
    with pytest.raises(SystemExit, match="no torchvision/ package"):
        load_tool("bench_data")(["--compare-hf", "1", "--torchvision-path", str(tmp_path)])
