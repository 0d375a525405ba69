"""Acceptance of issue 15's log-prob side: per-pair log-probs of packed chosen/rejected segments (images in
the prompts) from ``precompute_ref_logps`` equal a brute-force per-sample computation with transformers'
model on the same weights, at TP1 (as DP2: each rank its own packs), TP2 and PP2, in one torchrun launch."""
import json

import pytest

from tests.conftest import run_cmd

# fp32 end to end: the logits agree to ~3e-7 (test_parity.py); a pair's sum of 5-15 log-probs of size ~6 is
# O(60), whose fp32 ulp is 7.6e-6: measured 3.8e-6 at every layout. A TP rank using only its own vocab slice
# for the log-sum-exp, or a label shifted by one token, is off by O(1).
ATOL = 1e-5


@pytest.mark.slow
def test_pair_logps_match_hf_at_tp1_tp2_pp2(tiny_hf_dirs, imported, tmp_path):
    out = tmp_path / "logps.json"
    res = run_cmd(["tests/models/logps_checks.py", str(out), tiny_hf_dirs["qwen2_5_vl"], imported["qwen2_5_vl"],
                   "1:1", "2:1", "1:2"], nproc=2)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    result = json.loads(out.read_text())
    hf = result["hf"]
    assert len(hf) == 4 and all(c < -1 and r < -1 for c, r in hf.values())  # real sums, not zeros
    for layout in ("1:1", "2:1", "1:2"):
        r = result[layout]
        assert r["keys_match"] and r["num_pairs"] == 4, (layout, r)
        assert r["max_abs_diff"] < ATOL, (layout, r)
