"""Every command of the README's ```bash blocks is accounted for: run here as written, run by a named CI test,
or excluded with its reason. A new command in a bash block fails test_every_readme_command_is_accounted_for
until it is added to one of the three tables below.

The rule:
- RUN: commands on tiny/synthetic data cheap enough for this test (< 60 s together); they run verbatim, in
  order, with ``bash -euo pipefail -c``, the environment's bin/ first on PATH (as after
  ``source .venv/bin/activate``), in a scratch directory that mirrors the repository root (``tools/`` and
  ``examples/`` linked) so their relative outputs (``hf_tiny``, ...) do not land in the checkout.
- COVERED: run by another CI test with the same tool, subcommand and flags (only its own temporary paths, or
  the size overrides it names, differ); the test file must still contain those tokens. Synopsis lines
  (placeholders such as N, X.yaml, runs/x, A B C, [--optional]) are covered by the test that runs an instance.
- EXCLUDED: lines this test must not run, with the reason (CI has just run them itself).
"""
import json
import os
import re
import subprocess
import sys

import pytest

from tests.conftest import ROOT

README = os.path.join(ROOT, "README.md")

RUN = [
    "python tools/make_tiny_hf_model.py --family qwen2_5_vl --out hf_tiny",
    "python tools/convert_checkpoint.py import-hf --hf-dir hf_tiny --out ckpt_tiny",
    "python tools/make_synthetic_dataset.py --out data/synth --num 200 --seed 0",
    "python tools/check_dataset.py --data data/synth/train",
    "python tools/filter_dataset.py --data data/synth/train --out data/synth_filtered",
]

# command -> (test file, tokens that file must contain, what differs from the README line)
COVERED = {
    "bash examples/train_tiny.sh": (
        "tests/training/test_main_job.py", ['"examples/train_tiny.sh"'],
        "the same script with size overrides (4 steps, 200 samples, own data dir): the README's 400-step run takes "
        "about 9 minutes on a 2-core VM"),
    "torchrun --nproc_per_node=N -m mllm_mega.train --config examples/configs/X.yaml [dotted.key=value ...]": (
        "examples/train_tiny.sh", ["--nproc_per_node=2 -m mllm_mega.train", "--config examples/configs/"],
        "synopsis; its instance is the main job's script, run by tests/training/test_main_job.py"),
    "torchrun --nproc_per_node=2 tools/convert_checkpoint.py verify --hf-dir hf_tiny --load ckpt_tiny --tp 2": (
        "tests/models/test_parity.py", ['"verify"', '("qwen2_5_vl", "2", "1", None)'], "its own tiny HF dir"),
    "torchrun --nproc_per_node=2 tools/convert_checkpoint.py verify --hf-dir hf_tiny --load ckpt_tiny --pp 2 "
    "--num-llm-layers-in-first-stage 1": (
        "tests/models/test_parity.py", ['"verify"', '("qwen2_5_vl", "1", "2", "1")', "--num-llm-layers-in-first-stage"],
        "its own tiny HF dir"),
    "python tools/convert_checkpoint.py export-hf --load runs/x/checkpoints --out hf_out [--dtype bf16] "
    "[--max-shard-size 5GB]": (
        "tests/training/test_training.py", ['"export-hf", "--load"'], "synopsis; export of a training run"),
    "python tools/convert_checkpoint.py verify --hf-dir hf_out --load runs/x/checkpoints": (
        "tests/training/test_training.py", ['"verify", "--hf-dir"'], "synopsis; verify of that export"),
    "python tools/convert_checkpoint.py roundtrip --hf-dir hf_tiny [--tp 2] [--pp 2]": (
        "tests/tools/test_roundtrip.py", ['"roundtrip", "--hf-dir"'], "synopsis; TP/PP layouts parametrized"),
    "torchrun --nproc_per_node=2 tools/convert_checkpoint.py reshard --load ckpt_tiny --out ckpt_tp2 --tp 2": (
        "tests/tools/conftest.py", ['"reshard", "--load"', '["--tp", "2"]', "nproc=2"], "its own imported checkpoint"),
    "python tools/convert_checkpoint.py check --load runs/x/checkpoints": (
        "tests/training/test_integrity_runs.py", ['"check", "--load"'],
        "synopsis; through the CLI's main() on a training run's checkpoints"),
    "python tools/merge_checkpoints.py --inputs A B C --weights 0.5 0.3 0.2 --out merged": (
        "tests/tools/test_merge.py", ['"tools/merge_checkpoints.py", "--inputs"'], "synopsis"),
    "python tools/merge_checkpoints.py --inputs A B --method ties --base B0 --density 0.2 --lambda 1.0 --out merged": (
        "tests/tools/test_merge.py", ['method="ties"'], "synopsis; TIES through the library call the CLI makes"),
    "python tools/graft_vision.py --vision-from A --llm-from B --out grafted [--seed 0]": (
        "tests/tools/test_graft.py", ["--vision-from", "--llm-from"], "synopsis"),
    "python tools/compose_model.py --family open_qwen2vl --vision-from SIGLIP_HF_DIR --llm-from QWEN2_HF_DIR --out M "
    "[--seed 0] [--dtype bfloat16] [--max-shard-size 5GB]": (
        "tests/tools/test_compose_open_qwen2vl.py", ['load_tool("compose_model")', 'FAMILY = "open_qwen2vl"',
                                                     '"--vision-from"', '"--llm-from"', '"--dtype", "bfloat16"'],
        "synopsis; tiny SigLIP + Qwen2 sources, through the CLI's main()"),
    "torchrun --nproc_per_node=2 -m mllm_mega.train --config examples/configs/tiny_open_qwen2vl.yaml": (
        "tests/training/test_open_qwen2vl_training.py", ['"examples/configs/tiny_open_qwen2vl.yaml"', "train_many"],
        "the same config at TP1 in one process (run_many.py) with size overrides (6 steps, 1024-token packs, the "
        "tests' shapes data)"),
    "torchrun --nproc_per_node=2 -m mllm_mega.train --config examples/configs/tiny_open_qwen2vl.yaml "
    "run_dir=runs/tiny_open_qwen2vl_729 model.init_from=runs/tiny_open_qwen2vl/checkpoints "
    "\"model.arch_overrides={projector_pool_grid: 27}\" train.max_steps=100": (
        "tests/training/test_open_qwen2vl_training.py", ['"model.arch_overrides={projector_pool_grid: 27}"',
                                                         'f"model.init_from={s1}/checkpoints"'],
        "the second run of the same launch, 4 steps, from the first run's checkpoints"),
    # inline commands of the prose (synopses with placeholders)
    "python -m mllm_mega.train": (
        "examples/train_tiny.sh", ["-m mllm_mega.train"], "the entry point's name; its instance is the main job"),
    "python tools/plot_metrics.py RUN_DIR": (
        "tests/tools/test_plot_metrics.py", ['load_tool("plot_metrics")([str(run)])'], "synopsis"),
    "bash tools/gpu_check.sh --dry-run OUT_DIR": (
        "tests/tools/test_gpu_check.py", ['"tools/gpu_check.sh", "--dry-run"'], "its own temporary OUT_DIR"),
    "python tools/prepare_dataset.py --format llava|messages|preference --input FILE.json[l] [--image-root DIR] "
    "--out DIR [--samples-per-shard 10000] [--workers 4]": (
        "tests/data/test_convert.py", ['prepare_cli.main(["--format", "messages", "--input"'],
        "synopsis; every format through the library call, messages through the CLI's main()"),
    "torchrun --nproc_per_node=N tools/precompute_ref_logps.py --config X.yaml [--load CKPT] [--tp T --pp P] "
    "[--out FILE]": (
        "tests/models/logps_checks.py", ["from precompute_ref_logps import main as tool_main",
                                         '"--config", config, "--load", load, "--tp", tp, "--pp", pp, "--out"'],
        "synopsis; through the CLI's main() in a 2-rank launch at TP1 (DP2), TP2 and PP2 "
        "(tests/models/test_logps_parity.py)"),
    "python tools/check_dataset.py --data DIR --tokenizer TOK": (
        "tests/data/test_check_dataset.py", ['"tools/check_dataset.py"', '"--data"'], "synopsis"),
    "python tools/make_synthetic_dataset.py --out data/synth_pref --num 200 --preference": (
        "tests/data/test_preference.py", ['from tools.make_synthetic_dataset import main', '"--preference"'],
        "through the CLI's main(), 18 pairs in its own temporary directory"),
    "python tools/check_dataset.py --data data/synth_pref/train --preference": (
        "tests/data/test_preference.py", ['from tools.check_dataset import main', '"--data"', '"--preference"'],
        "through the CLI's main() on its own pairs (with bad ones) and --seq-len 256"),
    "bash examples/train_tiny_dpo.sh": (
        "tests/training/test_tiny_dpo_script.py", ['"examples/train_tiny_dpo.sh"'],
        "both stages shortened (2 SFT + 3 MPO steps on 40 pairs each); the full run takes minutes"),
    "python -m mllm_mega.train --config examples/configs/tiny_dpo.yaml": (
        "tests/objectives/test_preference_training.py", ['"objective": {"name": "preference"'],
        "the same objective on its own 24 synthetic pairs for 3 steps; the config's full run takes minutes"),
    "python tools/compose_model.py --family valley --vision-from QWEN2VL_HF_DIR --llm-from QWEN3_HF_DIR --out M "
    "[--position-mode mrope|1d] [--seed 0] [--dtype bfloat16] [--max-shard-size 5GB]": (
        "tests/tools/test_compose_model.py", ['load_tool("compose_model")', '"--vision-from"', '"--llm-from"'],
        "synopsis; tiny Qwen2-VL + Qwen3 sources, through the CLI's main() and one real command"),
}

# command -> why it cannot run here (checked to name a GPU)
NEEDS_GPU = {
    "bash tools/gpu_check.sh OUT_DIR": "the GPU acceptance run (needs CUDA); its CPU --dry-run is covered above",
}

# command -> why it is not run here
EXCLUDED = {
    "bash tools/setup_env.sh": "CI's first step (.ci/run) has just run it; rerunning would rebuild the environment",
    '.venv/bin/python -m pytest -m "not gpu" -q': "the whole suite, which is what is running this test (.ci/run)",
}


def readme_blocks():
    """(language, body) of every fenced block of the README."""
    with open(README) as f:
        return re.findall(r"^```(\w*)\n(.*?)^```", f.read(), re.S | re.M)


def readme_commands():
    """The commands of the bash blocks (continuation lines joined, comments dropped, ``a && b`` split) and the
    inline ones of the prose (a backquoted span starting with python, torchrun, bash or .venv/bin/python)."""
    with open(README) as f:
        prose = re.sub(r"^```(\w*)\n(.*?)^```", "", f.read(), flags=re.S | re.M)
    commands = [" ".join(m.split()) for m in
                re.findall(r"`((?:python|torchrun|bash|\.venv/bin/python) [^`]+)`", prose)]
    for lang, body in readme_blocks():
        if lang != "bash":
            continue
        for line in body.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if not line or line.startswith("#"):
                continue
            commands += [" ".join(part.split()) for part in line.split(" && ")]
    return commands


def test_every_readme_command_is_accounted_for():
    commands = readme_commands()
    assert len(commands) >= 15, commands  # the parser found the blocks
    tables = {"RUN": set(RUN), "COVERED": set(COVERED), "NEEDS_GPU": set(NEEDS_GPU), "EXCLUDED": set(EXCLUDED)}
    unaccounted = [c for c in commands if not any(c in t for t in tables.values())]
    assert unaccounted == [], f"README commands neither run, covered nor excluded in {__file__}: {unaccounted}"
    stale = [c for t in tables.values() for c in t if c not in commands]
    assert stale == [], f"entries no longer in the README: {stale}"
    # fenced blocks without a language are not shell (the Layout tree); a shell block must say bash
    for lang, body in readme_blocks():
        if lang != "bash":
            first = body.lstrip().split(maxsplit=1)[0] if body.strip() else ""
            assert first not in ("python", "torchrun", "bash", ".venv/bin/python", "pip"), body[:200]


@pytest.mark.parametrize("command", sorted(COVERED))
def test_covered_commands_are_run_by_the_named_test(command):
    path, tokens, _ = COVERED[command]
    with open(os.path.join(ROOT, path)) as f:
        text = f.read()
    missing = [t for t in tokens if t not in text]
    assert missing == [], f"{path} no longer runs `{command}` (missing {missing})"


def test_gpu_only_commands_say_why():
    assert all("GPU" in why or "CUDA" in why for why in NEEDS_GPU.values())


def test_excluded_commands_are_what_ci_runs():
    with open(os.path.join(ROOT, ".ci", "run")) as f:
        ci = f.read().splitlines()
    for command in EXCLUDED:
        assert command in ci, f"`{command}` is excluded as run by CI, but .ci/run does not run it"


def test_readme_commands_run_as_written(tmp_path):
    for name in ("tools", "examples"):
        os.symlink(os.path.join(ROOT, name), tmp_path / name)
    env = {**os.environ, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""),
           "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    last_line = {}
    for command in RUN:
        res = subprocess.run(["bash", "-euo", "pipefail", "-c", command], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, (command, res.stdout[-2000:], res.stderr[-3000:])
        last_line[command.split()[1]] = res.stdout.strip().splitlines()[-1] if res.stdout.strip() else ""
    # what the check and the filter report of the 200 synthetic samples (every one kept)
    check = json.loads(last_line["tools/check_dataset.py"])
    assert check["samples_ok"] == 200 and check["skipped_total"] == 0, check
    kept = json.loads(last_line["tools/filter_dataset.py"])
    assert kept["input_samples"] == 200 and kept["kept"] == 200, kept
    # what the two commands say they write
    assert os.path.isfile(tmp_path / "hf_tiny" / "config.json")
    assert os.path.isfile(tmp_path / "ckpt_tiny" / "mllm_mega.json")
    assert os.path.isfile(tmp_path / "data" / "synth" / "tokenizer" / "tokenizer.json")
    assert os.path.isfile(tmp_path / "data" / "synth_filtered" / "report.json")
