"""tools/precompute_ref_logps.py's input errors, in-process (its runs on data: tests/models/test_logps_parity.py)."""
import os

from tests.tools.conftest import load_tool


def test_errors_exit_2_naming_the_problem(tmp_path, capsys):
    main = load_tool("precompute_ref_logps")
    config = tmp_path / "run.yaml"
    config.write_text(f"data:\n  data_path: {tmp_path}/nowhere\n")
    assert main(["--config", str(config)]) == 2
    assert "give --load or set model.init_from" in capsys.readouterr().err
    assert main(["--config", str(config), "--load", str(tmp_path / "missing_ckpt")]) == 2
    err = capsys.readouterr().err
    assert "reference checkpoint" in err and "missing_ckpt" in err
    (tmp_path / "ckpt").mkdir()
    assert main(["--config", str(config), "--load", str(tmp_path / "ckpt")]) == 2
    assert "nowhere" in capsys.readouterr().err  # the data path that does not exist
    out = ["--out", str(tmp_path / "no_dir" / "f.json")]
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.tar").write_bytes(b"")
    assert main(["--config", str(config), "--load", str(tmp_path / "ckpt"), f"data.data_path={tmp_path}/data",
                 *out]) == 2
    assert "no_dir" in capsys.readouterr().err
    assert main(["--config", str(tmp_path / "no.yaml")]) == 2
    assert "no.yaml" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["ckpt", "data", "run.yaml"]  # nothing written
    assert os.listdir(tmp_path / "data") == ["a.tar"]
