"""tools/plot_metrics.py: a PNG from a hand-written metrics.jsonl; errors for missing or malformed input."""
import json
import math
import os

import pytest
from PIL import Image

from tests.tools.conftest import load_tool


def _record(it, loss=None, skipped=False):
    loss = 6.0 - 0.1 * it if loss is None else loss
    return {"iteration": it, "loss": loss, "grad_norm": 1.0, "lr": 1e-3 * min(1.0, it / 3),
            "loss_weight_sum": 10.0, "skipped_step": skipped, "nan_skipped_steps": 0, "real_tokens": 900,
            "consumed_samples": 4 * it, "step_time_s": 0.5, "tokens_per_s_per_gpu": 900.0 + it,
            "tflops_per_gpu": 0.002, "mfu": None, "peak_mem_gb": 0.7, "skipped_samples": {}}


def _write(run_dir, lines):
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "metrics.jsonl"), "w") as f:
        f.writelines(line + "\n" for line in lines)


def _valid_png(path):
    assert os.path.getsize(path) > 0
    with Image.open(path) as im:
        assert im.format == "PNG"
        im.verify()
    with Image.open(path) as im:
        assert im.size[0] > 100 and im.size[1] > 100


def test_writes_png_with_skipped_steps_and_resumed_duplicates(tmp_path):
    run = tmp_path / "run"
    records = [_record(i) for i in range(1, 11)]
    records[4] = _record(5, loss=math.nan, skipped=True)   # json.dumps writes NaN, as the trainer's logger does
    records[6] = _record(7, skipped=True)
    records += [_record(9, loss=5.0), _record(10, loss=4.9)]  # a resumed run re-logs iterations 9 and 10
    _write(str(run), [json.dumps(r) for r in records])
    assert load_tool("plot_metrics")([str(run)]) == 0
    _valid_png(run / "metrics.png")
    assert sorted(os.listdir(run)) == ["metrics.jsonl", "metrics.png"]  # no temporary file left

    out = tmp_path / "elsewhere.png"
    assert load_tool("plot_metrics")([str(run), "--out", str(out)]) == 0
    _valid_png(out)


def test_read_metrics_keeps_the_last_record_of_an_iteration(tmp_path):
    import importlib.util

    from tests.conftest import ROOT

    spec = importlib.util.spec_from_file_location("plot_metrics", os.path.join(ROOT, "tools", "plot_metrics.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    _write(str(tmp_path), [json.dumps(_record(i)) for i in (1, 2, 3)] + [json.dumps(_record(2, loss=1.5))])
    records = mod.read_metrics(str(tmp_path / "metrics.jsonl"))
    assert [r["iteration"] for r in records] == [1, 2, 3]
    assert records[1]["loss"] == 1.5


def test_missing_run_dir(tmp_path, capsys):
    assert load_tool("plot_metrics")([str(tmp_path / "nope")]) == 2
    assert "run directory" in capsys.readouterr().err


def test_missing_metrics(tmp_path, capsys):
    assert load_tool("plot_metrics")([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "metrics.jsonl not found" in err
    assert not os.path.exists(tmp_path / "metrics.png")


@pytest.mark.parametrize("lines, lineno, what", [
    ([], None, "no records"),
    (['{"iteration": 1, "loss": 5.0}', "", '{"iteration": 3, "loss": 4.0}'], 2, "empty line"),
    (['{"iteration": 1, "loss": 5.0}', '{"iteration": 2, "loss": 4.'], 2, "not valid JSON"),
    (["[1, 2]"], 1, "expected a JSON object"),
    (['{"iteration": 1, "loss": 5.0}', '{"loss": 4.0}'], 2, "no integer 'iteration'"),
    (['{"iteration": 1}'], 1, "no 'loss'"),
])
def test_malformed_metrics(tmp_path, capsys, lines, lineno, what):
    _write(str(tmp_path), lines)
    assert load_tool("plot_metrics")([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and what in err
    assert str(tmp_path / "metrics.jsonl") in err
    if lineno is not None:
        assert f"line {lineno}:" in err
    assert not os.path.exists(tmp_path / "metrics.png")


def test_out_directory_missing(tmp_path, capsys):
    _write(str(tmp_path), [json.dumps(_record(1))])
    assert load_tool("plot_metrics")([str(tmp_path), "--out", str(tmp_path / "no" / "x.png")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_preference_run_gets_a_rewards_panel(tmp_path):
    """Preference metrics (objective.name=preference) are drawn: the rewards panel plots the logged values."""
    import importlib.util

    from tests.conftest import ROOT

    spec = importlib.util.spec_from_file_location("plot_metrics", os.path.join(ROOT, "tools", "plot_metrics.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    records = []
    for i in range(1, 7):
        r = _record(i)
        r.update(rewards_chosen=0.01 * i, rewards_rejected=-0.02 * i, rewards_margin=0.03 * i,
                 rewards_accuracy=i / 6, bco_delta=0.001 * i, loss_preference=0.69 - 0.01 * i,
                 loss_quality=1.38 - 0.01 * i, loss_generation=3.0 - 0.1 * i)
        records.append(r)
    _write(str(tmp_path), [json.dumps(r) for r in records])
    curves = mod.plot(mod.read_metrics(str(tmp_path / "metrics.jsonl")), str(tmp_path / "m.png"), "t")
    _valid_png(tmp_path / "m.png")
    assert curves["reward accuracy"] == [r["rewards_accuracy"] for r in records]
    assert curves["margin"] == [r["rewards_margin"] for r in records]
    assert curves["reward rejected"] == [r["rewards_rejected"] for r in records]
    assert curves["quality term (BCO)"] == [r["loss_quality"] for r in records]
