"""Run configuration: nearest-key errors, overrides, stage presets, the resolved config in the run dir."""
import pytest

from mllm_mega.config import load_config
from tests.conftest import run_cmd


def test_mistyped_key_in_file_names_nearest(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  max_step: 3\n")
    with pytest.raises(ValueError, match=r"'train.max_step'.*did you mean 'train.max_steps'"):
        load_config(str(path))


def test_mistyped_section_and_override(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("optimiser:\n  lr: 1.0\n")
    with pytest.raises(ValueError, match=r"'optimiser'"):
        load_config(str(path))
    with pytest.raises(ValueError, match=r"'checkpoint.save_intervl'.*'checkpoint.save_interval'"):
        load_config(None, ["checkpoint.save_intervl=3"])
    with pytest.raises(ValueError, match=r"'data.seq_length'.*'data.seq_len'"):
        load_config(None, ["data.seq_length=3"])


def test_overrides_types_and_required_names():
    cfg = load_config(None, ["run_dir=runs/x", "train.max_steps=7", "checkpoint.save_interval=2",
                             "optimizer.lr=1e-4", "train.inject_nan_at=[2, 3]", "model.init_from=null"])
    assert cfg.run_dir == "runs/x" and cfg.train.max_steps == 7 and cfg.checkpoint.save_interval == 2
    assert cfg.optimizer.lr == 1e-4 and isinstance(cfg.optimizer.lr, float)  # YAML 1.1 reads 1e-4 as a string
    assert cfg.train.inject_nan_at == [2, 3] and cfg.model.init_from is None


def test_bad_values_name_the_key():
    with pytest.raises(ValueError, match="train.max_steps"):
        load_config(None, ["train.max_steps=0"])
    with pytest.raises(ValueError, match="optimizer.lr"):
        load_config(None, ["optimizer.lr=abc"])
    with pytest.raises(ValueError, match="global_batch_size"):
        load_config(None, ["train.global_batch_size=3", "train.micro_batch_size=2"])
    with pytest.raises(ValueError, match="stage.name"):
        load_config(None, ["stage.name=stage7"])


def test_stage_presets_and_explicit_values():
    s1 = load_config(None, ["stage.name=projector"]).stage
    assert (s1.freeze_vision, s1.freeze_merger, s1.freeze_llm) == (True, False, True)
    s15 = load_config(None, ["stage.name=vit_projector"]).stage
    assert (s15.freeze_vision, s15.freeze_llm, s15.lr_mult_vision) == (False, True, 0.1)
    s2 = load_config(None, ["stage.name=full", "stage.lr_mult_vision=0.5"]).stage
    assert (s2.freeze_vision, s2.freeze_llm, s2.lr_mult_vision) == (False, False, 0.5)


def test_cli_mistyped_key_exits_2(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  global_batch: 4\n")
    res = run_cmd(["-m", "mllm_mega.train", "--config", str(path)])
    assert res.returncode == 2
    assert "'train.global_batch'" in res.stderr and "train.global_batch_size" in res.stderr
    res = run_cmd(["-m", "mllm_mega.train", "--config", str(tmp_path / "missing.yaml")])
    assert res.returncode == 2 and "missing.yaml" in res.stderr


def test_shipped_configs_load():
    import glob
    import os

    from tests.conftest import ROOT

    paths = sorted(glob.glob(os.path.join(ROOT, "examples", "configs", "*.yaml")))
    assert paths
    for path in paths:
        load_config(path)
