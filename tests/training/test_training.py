"""Training semantics: layouts agree, micro-batch split invariance, NaN guard, stage freezing."""
import importlib.util
import math
import os

import pytest
import torch

from tests.conftest import ROOT
from tests.training.conftest import assert_ok, base_config, metrics, train_many


@pytest.fixture(scope="module")
def runs(shapes, tmp_path_factory):
    """Every run of this module, in two launches (one per world size; tests/training/run_many.py): a TP1
    reference run that also saved its initial weights (iteration 0), then runs started from those weights —
    at world size 1 the micro-batch split pair, the NaN run and stage 1; at world size 2 TP2, PP2 and DP2."""
    tmp = str(tmp_path_factory.mktemp("training"))
    cfg = base_config(shapes, tmp, train={"max_steps": 3}, checkpoint={"save_initial": True})
    d = {name: os.path.join(tmp, name) for name in ("initial", "mbs1", "mbs4", "nan", "stage1", "tp2", "pp2",
                                                     "dp2")}
    init = f"model.init_from={os.path.join(d['initial'], 'checkpoints', 'iter_0000000')}"
    one = {"initial": [], "nan": ["train.max_steps=10", "train.inject_nan_at=[2, 5, 6, 7]",
                                  "train.inject_nan_grad_at=[3]", "train.max_consecutive_nan_steps=3", init],
           "stage1": ["train.max_steps=2", "stage.name=projector", init]}
    for mbs in (1, 4):  # the same global batch of 4 packs as 4x1 and 1x4 (micro-batches x packs)
        one[f"mbs{mbs}"] = ["train.max_steps=2", "train.global_batch_size=4", f"train.micro_batch_size={mbs}",
                            init, "data.loss_reweighting=square"]
    two = {"tp2": ["parallel.tp=2", "train.max_steps=3", init], "pp2": ["parallel.pp=2", "train.max_steps=3", init],
           "dp2": ["train.max_steps=4", "train.same_data_at_any_dp=true", "train.inject_nan_grad_at=[4]", init]}
    res = train_many(tmp, {k: (cfg, [f"run_dir={d[k]}", *v]) for k, v in one.items()})
    assert_ok(res["initial"])
    res.update(train_many(tmp, {k: (cfg, [f"run_dir={d[k]}", *v]) for k, v in two.items()}, nproc=2))
    return {"cfg": cfg, "dirs": d, "res": res, "init": os.path.join(d["initial"], "checkpoints", "iter_0000000")}


def _run(runs, name):
    """(run_dir, result) of one run of the module's launches."""
    return runs["dirs"][name], runs["res"][name]


@pytest.mark.parametrize("layout", [("2", "1"), ("1", "2")], ids=["tp2", "pp2"])
def test_same_loss_at_tp2_and_pp2(runs, tmp_path, capsys, layout):
    tp, pp = layout
    run_dir, res = _run(runs, "tp2" if tp == "2" else "pp2")
    assert_ok(res)
    assert f"layout tp={tp} pp={pp} cp=1 dp=1" in res.stdout
    ref, got = metrics(runs["dirs"]["initial"]), metrics(run_dir)
    assert len(got) == 3
    for a, b in zip(ref, got):
        # fp32; TP/PP change the reduction order of the matmuls: measured loss rel diff 0 (3 steps, TP2 and PP2),
        # grad norm rel diff 3e-8 - 1.8e-7
        assert math.isclose(a["loss"], b["loss"], rel_tol=1e-6), (a["loss"], b["loss"])
        assert math.isclose(a["grad_norm"], b["grad_norm"], rel_tol=1e-6), (a["grad_norm"], b["grad_norm"])
        assert a["loss_weight_sum"] == b["loss_weight_sum"]
    # the run's checkpoint (model + optimizer, saved at this layout) exports to HF and matches HF's logits
    # (the tool's CLI, in this process: no interpreter start-up)
    convert_checkpoint = _tool("convert_checkpoint")
    hf = str(tmp_path / "hf")
    assert convert_checkpoint.main(["export-hf", "--load", f"{run_dir}/checkpoints", "--out", hf]) == 0
    import transformers

    model = transformers.AutoModelForImageTextToText.from_pretrained(hf)
    assert model.config.text_config.vocab_size % 64 == 0
    transformers.AutoTokenizer.from_pretrained(hf)
    transformers.AutoImageProcessor.from_pretrained(hf)
    capsys.readouterr()
    assert convert_checkpoint.main(["verify", "--hf-dir", hf, "--load", f"{run_dir}/checkpoints"]) == 0
    out = capsys.readouterr().out
    # fp32: measured ~3e-7; a tanh-approximate GELU in the merger gives 3.6e-5
    assert float(out.strip().splitlines()[-1].split()[0].split("=")[1]) < 1e-6, out


def _tool(name):
    """tools/<name>.py as a module (its ``main`` is the CLI)."""
    spec = importlib.util.spec_from_file_location(f"tool_{name}", os.path.join(ROOT, "tools", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_microbatch_split_invariance(runs):
    """The same global batch of 4 packs as 4x1 and 1x4 (micro-batches x packs) gives the same loss."""
    losses = {}
    for mbs in (1, 4):
        run_dir, res = _run(runs, f"mbs{mbs}")
        assert_ok(res)
        losses[mbs] = metrics(run_dir)
        assert len(losses[mbs]) == 2
    for mbs in (4,):
        for a, b in zip(losses[1], losses[mbs]):
            assert a["loss_weight_sum"] == b["loss_weight_sum"]
            assert math.isclose(a["loss"], b["loss"], rel_tol=1e-6), (mbs, a["loss"], b["loss"])
            assert math.isclose(a["grad_norm"], b["grad_norm"], rel_tol=1e-5), (mbs, a["grad_norm"], b["grad_norm"])


def test_nan_is_skipped_counted_and_stops_when_repeated(runs):
    """A NaN loss (step 2) and a NaN in one gradient element only, with a finite loss (step 3), are skipped;
    a good step resets the count; three in a row (5-7) stop the run with exit 1 and a clear message."""
    run_dir, res = _run(runs, "nan")
    assert res.returncode == 1, (res.stdout[-2000:], res.stderr[-3000:])
    assert "3 consecutive steps with NaN/Inf" in res.stderr
    m = metrics(run_dir)
    assert [r["skipped_step"] for r in m] == [False, True, True, False, True, True, True]
    assert [r["nan_skipped_steps"] for r in m] == [0, 1, 2, 2, 3, 4, 5] and math.isnan(m[1]["loss"])
    assert math.isfinite(m[2]["loss"]) and math.isnan(m[2]["grad_norm"])  # only the gradient was bad
    assert res.stdout.count("NaN/Inf in loss or gradients, step skipped") == 5
    # the skipped steps did not touch the weights: steps 2-4 see the weights after step 1 only, so their
    # losses differ from the reference run's (which updated every step) yet are finite
    ref = metrics(runs["dirs"]["initial"])
    assert m[0]["loss"] == ref[0]["loss"]
    assert math.isfinite(m[3]["loss"]) and m[2]["loss"] != ref[2]["loss"]
    assert math.isfinite(m[3]["grad_norm"])


def test_dp2_equals_dp1_for_the_same_global_batch(runs):
    """DP2 (one micro-batch per rank) vs DP1 (both micro-batches on one rank) on the same global batches:
    the loss-weight denominator and the gradients are summed over DP ranks, so losses and grad norms agree to
    fp32 rounding. Also: a NaN in one rank's gradient only (step 4) makes every rank skip the step."""
    run_dir, res = _run(runs, "dp2")
    assert_ok(res)
    assert "dp=2" in res.stdout
    ref, got = metrics(runs["dirs"]["initial"]), metrics(run_dir)
    assert len(got) == 4
    for a, b in zip(ref, got[:3]):
        assert a["loss_weight_sum"] == b["loss_weight_sum"] and a["real_tokens"] == b["real_tokens"]
        # measured: loss rel diff <= 1e-7, grad norm <= 1e-6 (the gradient all-reduce sums in another order)
        assert math.isclose(a["loss"], b["loss"], rel_tol=1e-6), (a["loss"], b["loss"])
        assert math.isclose(a["grad_norm"], b["grad_norm"], rel_tol=1e-5), (a["grad_norm"], b["grad_norm"])
    assert got[3]["skipped_step"] and got[3]["nan_skipped_steps"] == 1


def _weights(path, cfg_path, run_dir):
    """Full (TP1) model state dict of a checkpoint, loaded in this process."""
    from mllm_mega.config import load_config
    from mllm_mega.models.qwen2_vl.family import build_model
    from mllm_mega.data.text import TextProcessor
    from mllm_mega.parallel.initialize import initialize_distributed
    from mllm_mega.training import checkpointing as ckpt
    from mllm_mega.training.setup import layout_of, resolve_arch

    cfg = load_config(cfg_path, [f"run_dir={run_dir}"])
    initialize_distributed(1, 1)
    model = build_model(resolve_arch(cfg, TextProcessor(cfg.data.tokenizer_dir)), layout_of(cfg))
    ckpt.load_model_weights(path, model)
    return {k: v.clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}


def test_stage1_trains_only_the_projector(runs):
    run_dir, res = _run(runs, "stage1")
    assert_ok(res)
    before = _weights(runs["init"], runs["cfg"], run_dir)
    after = _weights(os.path.join(run_dir, "checkpoints"), runs["cfg"], run_dir)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("vision.merger.") for k in changed), sorted(changed)[:5]
    assert {k for k in before if k.startswith("vision.merger.") and "weight" in k} <= changed
