"""merge_checkpoints: linear (weighted average) and TIES, the arithmetic on hand-computed cases, end to end on
tiny checkpoints, and refusals (mismatched architectures, bad paths/options) that write nothing."""
import json
import os

import pytest
import torch

from mllm_mega.checkpoint.io import load_full_state, resolve_checkpoint
from mllm_mega.checkpoint.merge import (
    check_same_tensors, linear_merge, merge_checkpoints, ties_merge, trim_top_k,
)
from tests.conftest import run_cmd
from tests.tools.conftest import assert_nothing_written, load_tool


def _state(path):
    return load_full_state(resolve_checkpoint(path))


# ---- arithmetic -------------------------------------------------------------------------------------------
def test_linear_merge_small():
    a, b = torch.tensor([1.0, 2.0, -4.0]), torch.tensor([3.0, 0.0, 4.0])
    assert torch.equal(linear_merge([a, b], [0.25, 0.75]), torch.tensor([2.5, 0.5, 2.0]))


def test_trim_top_k():
    tau = torch.tensor([[3.0, -1.0, 0.5], [-2.0, 4.0, 0.1]])
    assert torch.equal(trim_top_k(tau, 0.5), torch.tensor([[3.0, 0.0, 0.0], [-2.0, 4.0, 0.0]]))
    assert torch.equal(trim_top_k(tau, 0.3), torch.tensor([[3.0, 0.0, 0.0], [0.0, 4.0, 0.0]]))  # ceil(1.8) = 2
    assert int((trim_top_k(torch.arange(1.0, 31.0), 0.1) != 0).sum()) == 3  # 0.1 * 30 = 3.0000000000000004
    assert torch.equal(trim_top_k(tau, 1.0), tau)


def test_ties_hand_computed():
    base = torch.ones(5)
    taus = [torch.tensor([3.0, -1.0, 0.5, -2.0, 4.0]),
            torch.tensor([-1.0, -2.0, 1.0, 5.0, 0.2]),
            torch.tensor([-4.0, 0.1, -3.0, 1.0, -0.5])]
    # density 0.6 keeps ceil(3) = 3 of 5 entries per task vector:
    #   trimmed: [3, 0, 0, -2, 4], [0, -2, 1, 5, 0], [-4, 0, -3, 1, 0]
    #   sum [-1, -2, -2, 4, 4] -> elected signs [-, -, -, +, +]
    #   disjoint means: [-4, -2, -3, (5+1)/2 = 3, 4]; lambda 0.5 -> base + [-2, -1, -1.5, 1.5, 2]
    out = ties_merge(base, [base + t for t in taus], density=0.6, lam=0.5)
    assert torch.equal(out, torch.tensor([-1.0, 0.0, -0.5, 2.5, 3.0]))
    # opposite task vectors cancel: the elected sign is 0 and the base is kept
    assert torch.equal(ties_merge(base, [base + 1, base - 1], density=1.0), base)


def test_check_same_tensors_names_the_tensor():
    a = {"x": torch.zeros(2, 3), "y": torch.zeros(1)}
    with pytest.raises(ValueError, match=r"tensor x: shape \(2, 3\) in 'A' but \(3, 2\) in 'B'"):
        check_same_tensors(["A", "B"], [a, {"x": torch.zeros(3, 2), "y": torch.zeros(1)}])
    with pytest.raises(ValueError, match="tensor y is in 'A' but not in 'B'"):
        check_same_tensors(["A", "B"], [a, {"x": torch.zeros(2, 3)}])


# ---- end to end -------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_linear_merge_with_itself_is_the_identity_cli(ckpts, tmp_path):
    out = str(tmp_path / "m")
    src = ckpts["qwen2_5_vl"]
    res = run_cmd(["tools/merge_checkpoints.py", "--inputs", src, src, "--out", out])
    assert res.returncode == 0, res.stderr[-3000:]
    a, m = _state(src), _state(out)
    assert set(a) == set(m) and all(torch.equal(a[k], m[k]) for k in a)
    meta = json.load(open(os.path.join(out, "mllm_mega.json")))
    assert meta["hf_config"] == json.load(open(os.path.join(src, "mllm_mega.json")))["hf_config"]
    assert meta["merge"]["method"] == "linear" and meta["merge"]["weights"] == [0.5, 0.5]
    assert os.listdir(os.path.join(out, "hf_extra")) == os.listdir(os.path.join(src, "hf_extra"))


def test_linear_merge_is_the_weighted_average(ckpts, tmp_path):
    a_path, b_path = ckpts["qwen2_5_vl"], ckpts["q25_seed7"]
    out = str(tmp_path / "m")
    merge_checkpoints([a_path, b_path], out, weights=[3, 1], progress=False)  # normalised: 0.75, 0.25
    a, b, m = _state(a_path), _state(b_path), _state(out)
    assert set(m) == set(a)
    for k in a:
        expected = (0.75 * a[k].double() + 0.25 * b[k].double()).float()
        torch.testing.assert_close(m[k], expected, rtol=0, atol=0, msg=k)
    assert not torch.equal(m["vision.patch_embed.weight"], a["vision.patch_embed.weight"])


def test_ties_merge_end_to_end(ckpts, tmp_path):
    base_path, a_path, b_path = ckpts["qwen2_5_vl"], ckpts["q25_seed7"], ckpts["qwen2_5_vl"]
    out = str(tmp_path / "ties")
    merge_checkpoints([a_path, b_path], out, method="ties", base=base_path, density=0.3, lam=0.8, progress=False)
    base, a, m = _state(base_path), _state(a_path), _state(out)
    for k in base:  # b == base: its task vector is 0, so the merge is base + 0.8 * trim(a - base)
        expected = (base[k].double() + 0.8 * trim_top_k(a[k].double() - base[k].double(), 0.3)).float()
        assert torch.equal(m[k], expected), k
    meta = json.load(open(os.path.join(out, "mllm_mega.json")))["merge"]
    assert meta["density"] == 0.3 and meta["lambda"] == 0.8 and meta["base"] == os.path.abspath(base_path)


# ---- refusals ---------------------------------------------------------------------------------------------
def _cases(ckpts, hf_dirs, tmp_path):
    a, b = ckpts["qwen2_5_vl"], ckpts["q25_seed7"]
    empty = tmp_path / "empty"
    empty.mkdir()
    return {
        "other_family": (["--inputs", a, ckpts["qwen2_vl"]], "architectures differ: family is 'qwen2_5_vl'"),
        "other_width": (["--inputs", a, ckpts["wide_bf16"]], "architectures differ: text.hidden_size is 64"),
        "missing": (["--inputs", a, str(tmp_path / "nope")], "nope' does not exist"),
        "hf_dir": (["--inputs", a, hf_dirs["qwen2_5_vl"]], "is not an mllm_mega checkpoint"),
        "empty_dir": (["--inputs", str(empty), a], "is not an mllm_mega checkpoint"),
        "one_input": (["--inputs", a], "need at least 2 checkpoints"),
        "weights_count": (["--inputs", a, b, "--weights", "1", "2", "3"], "3 weight(s) for 2 input(s)"),
        "weights_sum": (["--inputs", a, b, "--weights", "1", "-1"], "must sum to a positive number"),
        "ties_no_base": (["--inputs", a, b, "--method", "ties"], "needs --base"),
        "ties_weights": (["--inputs", a, b, "--method", "ties", "--base", a, "--weights", "1", "1"],
                         "--weights is only used by --method linear"),
        "linear_base": (["--inputs", a, b, "--base", a], "--base is only used by --method ties"),
        "bad_density": (["--inputs", a, b, "--method", "ties", "--base", a, "--density", "0"], "--density"),
        "bad_base": (["--inputs", a, b, "--method", "ties", "--base", ckpts["qwen2_vl"]], "architectures differ"),
    }


@pytest.mark.parametrize("case", ["other_family", "other_width", "missing", "hf_dir", "empty_dir", "one_input",
                                  "weights_count", "weights_sum", "ties_no_base", "ties_weights", "linear_base",
                                  "bad_density", "bad_base"])
def test_merge_refusals(ckpts, hf_dirs, tmp_path, capsys, case):
    args, needle = _cases(ckpts, hf_dirs, tmp_path)[case]
    out = str(tmp_path / "out")
    rc = load_tool("merge_checkpoints")([*args, "--out", out])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: merge failed:") and needle in err, err
    assert_nothing_written(out)


def test_merge_refuses_a_non_empty_out(ckpts, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep").write_text("x")
    rc = load_tool("merge_checkpoints")(["--inputs", ckpts["qwen2_5_vl"], ckpts["q25_seed7"], "--out", str(out)])
    assert rc == 2 and "exists and is not an empty directory" in capsys.readouterr().err
    assert os.listdir(out) == ["keep"]
