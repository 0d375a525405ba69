"""Acceptance of issue 15's log-prob side, in one torchrun launch of 2 ranks (tests/models/logps_checks.py):
per-pair log-probs equal a brute-force per-sample computation with transformers' model on the same weights
- from ``precompute_ref_logps`` on hand-built packed pairs (own image per segment, a text-only prompt) at TP2;
- from ``tools/precompute_ref_logps.py`` on synthetic preference data (the loader's packs: chosen and rejected
  segments sharing the pair's image, ViT once per pair) at TP1 (as DP2), TP2 and PP2, read back from the file;
and every preference loss term (preset mpo through the real ``train_step``, the reference a second model's
log-probs) equals the formulas written out here on transformers' per-sample log-probs, at the same layouts.
"""
import json
import math
import os

import pytest
import torch

from tests.conftest import run_cmd
from tests.models.logps_checks import LOSS_BETA

# fp32 end to end: the logits agree to ~3e-7 (test_parity.py); a pair's sum of ~5-40 log-probs of size ~6 is
# O(40-60), whose fp32 ulp is 3.8-7.6e-6: measured 3.8e-6 (hand-built packs, every layout) and 3.8-7.6e-6
# (the tool, every layout). A TP rank using only its own vocab slice for the log-sum-exp (measured 7.3), or a
# label shifted by one token, is off by O(1).
ATOL = 2e-5
TOOL_LAYOUTS = ("1:1", "2:1", "1:2")
# the loss terms: O(1) values from sums that agree to ~4e-6 times beta, over means: measured max abs diff
# 7.2e-7 (rewards margin), every layout and both steps. Measured off: beta applied twice in the DPO term 1.5e-2,
# chosen/rejected swapped at PP2 only 7.1 (PP2 only), the SFT term on the rejected completions 9.3e-3, a BCO
# delta never updated 3.6e-3 (step 2's quality term).
LOSS_ATOL = 2e-6
MPO = (0.8, 0.2, 1.0)  # InternVL2.5-MPO's weights


def expected_terms(hf: dict, beta: float, delta: float) -> dict:
    """The preference objective's metrics from per-pair sums {key: [policy c, policy r, ref c, ref r, n]}
    (n: the chosen completion's token count; loss weight 1/sqrt(n) on each of its tokens), in float64."""
    pc, pr, qc, qr, n = torch.tensor(list(hf.values()), dtype=torch.float64).T
    rc, rr = beta * (pc - qc), beta * (pr - qr)
    pref = -torch.log(torch.sigmoid(rc - rr)).mean()  # sigmoid DPO
    qual = (-torch.log(torch.sigmoid(rc - delta)) - torch.log(1 - torch.sigmoid(rr - delta))).mean()  # BCO
    gen = -(pc / n.sqrt()).sum() / (n / n.sqrt()).sum()  # SFT on chosen: sum w * CE / sum w, w = 1/sqrt(n)
    return {"loss_preference": float(pref), "loss_quality": float(qual), "loss_generation": float(gen),
            "loss": float(MPO[0] * pref + MPO[1] * qual + MPO[2] * gen), "rewards_chosen": float(rc.mean()),
            "rewards_rejected": float(rr.mean()), "rewards_margin": float((rc - rr).mean()),
            "rewards_accuracy": float((rc > rr).double().mean()), "bco_delta": delta}


@pytest.mark.slow
def test_pair_logps_match_hf_at_tp1_tp2_pp2(tiny_hf_dirs, imported, tmp_path):
    from mllm_mega.data.synthetic import make_dataset

    data = tmp_path / "pref"
    make_dataset(str(data), 8, 0, num_eval=1, samples_per_shard=4, preference=True, size_range=(56, 84))
    config = tmp_path / "pref.yaml"
    config.write_text(f"data:\n  data_path: {data}/train\n  tokenizer_dir: {data}/tokenizer\n  preference: true\n"
                      "  seq_len: 512\n  num_workers: 1\n  prefetch: 0\n"
                      "model:\n  kernels: torch\n  dtype: float32\n")
    work = tmp_path / "work"
    work.mkdir()
    out = tmp_path / "logps.json"
    res = run_cmd(["tests/models/logps_checks.py", str(out), tiny_hf_dirs["qwen2_5_vl"], imported["qwen2_5_vl"],
                   "2:1", "--loss", str(tmp_path), *TOOL_LAYOUTS, "--tool", str(config), str(work), *TOOL_LAYOUTS],
                  nproc=2)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    result = json.loads(out.read_text())
    assert len(result["hf"]) == 4 and all(c < -1 and r < -1 for c, r in result["hf"].values())  # real sums
    r = result["2:1"]
    assert r["keys_match"] and r["num_pairs"] == 4 and r["max_abs_diff"] < ATOL, r
    assert "read by two data-parallel ranks" in result["duplicate_error"], result["duplicate_error"]
    for layout in TOOL_LAYOUTS:
        r = result[f"tool {layout}"]
        tp, pp = (int(x) for x in layout.split(":"))
        assert r["code"] == 0 and r["layout"] == {"tp": tp, "pp": pp, "dp": 2 // (tp * pp)}, r
        assert r["keys_match"] and r["num_pairs"] == 8 and r["max_abs_diff"] < ATOL, (layout, r)
    assert sorted(os.listdir(work)) == ["ckpt", "hf"] + [f"ref_logps.tp{t}pp{p}.json" for t, p in
                                                         ((1, 1), (1, 2), (2, 1))]  # no temporary left

    # the loss terms, step 1 (BCO delta 0) and step 2 (delta = step 1's batch-mean reward; lr 1e-12: same weights)
    step1 = expected_terms(result["loss hf"], LOSS_BETA, 0.0)
    step2 = expected_terms(result["loss hf"], LOSS_BETA, (step1["rewards_chosen"] + step1["rewards_rejected"]) / 2)
    assert 0 < step1["rewards_accuracy"] < 1 and abs(step1["rewards_margin"]) > 0.05  # r != 0, both signs
    assert abs(step2["bco_delta"]) > 0.05 and step1["loss_generation"] > 1
    for layout in TOOL_LAYOUTS:
        for step, want in enumerate((step1, step2)):
            got = result[f"loss {layout}"][step]
            assert not got["skipped"] and math.isfinite(got["grad_norm"]), (layout, got)
            for key, value in want.items():
                # only the policy's sums differ (packed, our TP/PP vs transformers alone): measured <= 7.2e-7
                assert abs(got[key] - value) < LOSS_ATOL, (layout, step + 1, key, got[key], value)
