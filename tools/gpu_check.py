"""One-shot GPU check: ``bash tools/gpu_check.sh [--dry-run] OUT_DIR`` (this file does the work).

On one H100/H200 with no network it runs, each stage under its own time limit (all within 9 minutes):
imports (what an offline machine must be given), ``pytest -m gpu``, ``tools/bench_kernels.py --op all``,
the DALI decode benchmark (``tools/bench_data.py``, GPU ``mixed`` decoding), a synthetic dataset, and a bf16
training run of a ~0.75B random-weight Qwen2.5-VL-shaped model on 4096-token packs
(``examples/configs/gpu_check_qwen2_5_vl_1b.yaml``) with ``kernels: triton`` and again with ``kernels: torch``
(losses compared; tokens/s/GPU, TFLOP/s, MFU, peak memory side by side from each run's metrics.jsonl).
It writes ``OUT_DIR/results.json`` and ``OUT_DIR/summary.md`` (and ``OUT_DIR/logs/<stage>.log``); a failing
stage is recorded and the others still run; the exit code is 1 if any stage failed.

``--dry-run``: the same stages on CPU with tiny shapes (kernels under TRITON_INTERPRET, fp32 training of a
1-layer model for 2 steps, DALI CPU decoding), so CI checks the script itself; ``pytest -m gpu`` is skipped.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = "examples/configs/gpu_check_qwen2_5_vl_1b.yaml"
TOTAL_LIMIT_S = 530  # under 9 minutes including start-up; every stage is cut to what is left of it
# Per-stage limits (seconds), so one hang cannot eat the budget. Sized for an H100/H200: not yet measured there.
LIMITS = {"imports": 60, "pytest_gpu": 120, "bench_kernels": 90, "bench_data": 45, "dataset": 45,
          "train_triton": 90, "train_torch": 90}
DRY_LIMITS = {"imports": 60, "pytest_gpu": 10, "bench_kernels": 120, "bench_data": 60, "dataset": 60,
              "train_triton": 180, "train_torch": 120}
MODULES = ("torch", "triton", "nvidia.dali", "megatron.core", "transformers", "mllm_mega._packer",
           "mllm_mega._patchify")
# What an offline GPU machine must be given (pip download on a networked machine with the same Python and
# CUDA major version, e.g. `pip download -d wheels torch==2.13.0 --index-url https://download.pytorch.org/whl/cu130`).
WHEELS = ("torch (a CUDA build)", "triton", "nvidia-dali-cuda130", "megatron-core==0.16.1", "transformers>=5.0",
          "safetensors", "numpy", "pyyaml", "tqdm", "psutil", "pillow", "webdataset", "tokenizers", "pytest",
          "hypothesis", "pybind11", "setuptools", "wheel")
INSTALL_HINT = ("pip install --no-index --find-links WHEEL_DIR torch triton nvidia-dali-cuda130 megatron-core==0.16.1 "
                "transformers pytest hypothesis pybind11 && pip install --no-index --find-links WHEEL_DIR "
                "--no-build-isolation -e .")
# bf16 runs with different kernels round differently and drift apart over 30 steps; 2% per step is a
# first guess (not yet measured on GPU). fp32 dry runs agree to rounding (measured equal on CPU).
LOSS_RTOL = {"gpu": 2e-2, "dry": 1e-5}
# dry run: the smallest model that runs every slot (1 LLM layer, 1 full-attention ViT layer)
DRY_TINY = {"num_hidden_layers": 1, "vision_overrides": {"depth": 1, "fullatt_block_indexes": [0]}}


def _py(*args: str) -> list[str]:
    return [sys.executable, *args]


class Runner:
    def __init__(self, out: str, dry: bool):
        self.out, self.dry = out, dry
        self.logs = os.path.join(out, "logs")
        os.makedirs(self.logs, exist_ok=True)
        self.start = time.monotonic()
        self.stages: dict[str, dict] = {}

    def run(self, name: str, cmd: list[str], env: dict | None = None) -> dict:
        """Run one stage in its own process group, killed at its limit; output goes to logs/<name>.log."""
        limit = (DRY_LIMITS if self.dry else LIMITS)[name]
        left = TOTAL_LIMIT_S - (time.monotonic() - self.start) if not self.dry else limit
        limit = max(1, int(min(limit, left)))
        log = os.path.join(self.logs, f"{name}.log")
        print(f"[gpu_check] {name}: {' '.join(cmd)} (limit {limit}s)", flush=True)
        t = time.monotonic()
        with open(log, "w") as f:
            proc = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, start_new_session=True,
                                    env={**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})})
            try:
                rc = proc.wait(timeout=limit)
                status = "ok" if rc == 0 else "failed"
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                rc, status = None, "timeout"
        rec = {"status": status, "rc": rc, "seconds": round(time.monotonic() - t, 1), "limit_s": limit,
               "command": " ".join(cmd), "log": os.path.relpath(log, self.out)}
        if status != "ok":
            with open(log) as f:
                rec["log_tail"] = f.read()[-2000:]
        self.stages[name] = rec
        print(f"[gpu_check] {name}: {status} in {rec['seconds']}s", flush=True)
        return rec

    def skip(self, name: str, reason: str) -> None:
        self.stages[name] = {"status": "skipped", "reason": reason}
        print(f"[gpu_check] {name}: skipped ({reason})", flush=True)

    def fail(self, name: str, reason: str) -> None:
        self.stages[name].update(status="failed", reason=reason)
        print(f"[gpu_check] {name}: failed ({reason})", flush=True)


def _last_json(log_path: str):
    with open(log_path) as f:
        for line in reversed(f.read().splitlines()):
            if line.startswith("{"):
                return json.loads(line)
    raise ValueError(f"{log_path}: no JSON summary line")


IMPORT_CHECK = """
import importlib, json, sys
out = {}
for name in sys.argv[2:]:
    try:
        mod = importlib.import_module(name)
        out[name] = getattr(mod, "__version__", "ok")
    except Exception as e:
        out[name] = None
        print(f"missing: {name}: {e!r}")
import torch
out["cuda"] = torch.cuda.is_available()
out["device"] = torch.cuda.get_device_name() if out["cuda"] else "cpu"
print(json.dumps(out))
need_cuda = sys.argv[1] == "gpu"
sys.exit(0 if all(out[n] for n in sys.argv[2:]) and (out["cuda"] or not need_cuda) else 1)
"""


def stage_imports(r: Runner) -> None:
    rec = r.run("imports", _py("-c", IMPORT_CHECK, "dry" if r.dry else "gpu", *MODULES))
    try:
        found = _last_json(os.path.join(r.out, rec["log"]))
    except ValueError:
        found = {}
    rec["found"] = found
    if rec["status"] != "ok":
        print("[gpu_check] an offline GPU machine needs these wheels: " + ", ".join(WHEELS), flush=True)
        print(f"[gpu_check] install them from a local directory: {INSTALL_HINT}", flush=True)
        rec["wheels_needed"], rec["install"] = list(WHEELS), INSTALL_HINT
        if not found.get("cuda", True) and not r.dry:
            rec["reason"] = "torch sees no CUDA device"


def stage_pytest(r: Runner) -> None:
    if r.dry:
        r.skip("pytest_gpu", "no GPU (dry run)")
        return
    rec = r.run("pytest_gpu", _py("-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "-rfEs"))
    with open(os.path.join(r.out, rec["log"])) as f:
        lines = [ln for ln in f.read().splitlines() if " in " in ln and ("passed" in ln or "failed" in ln)]
    rec["result"] = lines[-1].strip("= ") if lines else None


def stage_bench_kernels(r: Runner) -> None:
    rec = r.run("bench_kernels", _py("tools/bench_kernels.py", "--op", "all", "--json"))
    if rec["status"] != "ok":
        return
    data = _last_json(os.path.join(r.out, rec["log"]))
    rec["device"], rec["cpu_interpreter"] = data["device"], data["cpu_interpreter"]
    keys = ("workload", "impl", "pass", "ms", "tflops", "gbps", "err_vs_first", "skipped")
    rec["records"] = [{k: x[k] for k in keys if k in x} for x in data["records"]]
    if not rec["records"] or data["cpu_interpreter"] != r.dry:
        r.fail("bench_kernels", f"{len(rec['records'])} records, cpu_interpreter={data['cpu_interpreter']}")


def stage_bench_data(r: Runner) -> None:
    if r.dry:
        args = ["--num-images", "8", "--size", "96", "64", "--backends", "dali-cpu", "--repeats", "1",
                "--threads", "2"]
        want = "dali-cpu"
    else:
        args = ["--num-images", "256", "--backends", "pil", "dali-cpu", "dali-gpu", "--repeats", "3"]
        want = "dali-gpu"
    rec = r.run("bench_data", _py("tools/bench_data.py", *args))
    if rec["status"] != "ok":
        return
    rec["images_per_s"] = _last_json(os.path.join(r.out, rec["log"]))["images_per_s"]
    if want not in rec["images_per_s"]:
        r.fail("bench_data", f"backend {want} did not run (DALI or its GPU decoder missing)")


def stage_dataset(r: Runner) -> str:
    data = os.path.join(r.out, "data")
    shutil.rmtree(data, ignore_errors=True)
    size = ["56", "112"] if r.dry else ["224", "448"]  # GPU: 16-32 patches a side, a real ViT load
    num = "30" if r.dry else "1500"
    r.run("dataset", _py("tools/make_synthetic_dataset.py", "--out", data, "--num", num, "--num-eval", "2",
                         "--image-size", *size))
    return data


def stage_train(r: Runner, data: str, kernels: str) -> None:
    name = f"train_{kernels}"
    run_dir = os.path.join(r.out, name)
    shutil.rmtree(run_dir, ignore_errors=True)  # a rerun into the same OUT_DIR must not mix metrics
    overrides = [f"run_dir={run_dir}", f"model.kernels={kernels}", f"data.data_path={data}/train",
                 f"data.tokenizer_dir={data}/tokenizer", "checkpoint.resume=false"]
    env = {}
    if r.dry:  # fp32: the interpreter's bf16 tl.dot is wrong
        overrides += ["model.dtype=float32", "data.seq_len=64", "train.max_steps=2", "train.global_batch_size=1",
                      "data.max_pixels=3136", "data.num_workers=1", "logging.log_interval=1",
                      f"model.tiny_overrides={json.dumps(DRY_TINY)}"]
        env = {"TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    rec = r.run(name, _py("-m", "mllm_mega.train", "--config", CONFIG, *overrides), env=env)
    path = os.path.join(run_dir, "metrics.jsonl")
    if rec["status"] != "ok" or not os.path.isfile(path):
        return
    with open(path) as f:
        rows = [json.loads(line) for line in f]
    steady = rows[5:] if len(rows) > 10 else rows  # skip warm-up steps (Triton JIT, allocator, DALI start)

    def med(key):
        vals = [x[key] for x in steady if x.get(key) is not None]
        return statistics.median(vals) if vals else None

    rec.update(steps=len(rows), losses=[x["loss"] for x in rows], grad_norms=[x["grad_norm"] for x in rows],
               tokens_per_s_per_gpu=med("tokens_per_s_per_gpu"), tflops_per_gpu=med("tflops_per_gpu"),
               mfu=med("mfu"), peak_mem_gb=max(x["peak_mem_gb"] for x in rows),
               step_time_s=med("step_time_s"), kernel_launches=rows[0].get("kernel_launches"))


def stage_compare(r: Runner) -> None:
    a, b = r.stages.get("train_triton", {}), r.stages.get("train_torch", {})
    rec = r.stages["compare_training"] = {"status": "ok"}
    if "losses" not in a or "losses" not in b:
        rec.update(status="failed", reason="a training run failed")
        return
    rtol = LOSS_RTOL["dry" if r.dry else "gpu"]
    diffs = [abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a["losses"], b["losses"])]
    rec.update(max_rel_loss_diff=max(diffs), loss_rtol=rtol)
    problems = []
    if len(a["losses"]) != len(b["losses"]):
        problems.append(f"{len(a['losses'])} vs {len(b['losses'])} steps")
    if max(diffs) > rtol:
        problems.append(f"losses differ by up to {max(diffs):.2e} (relative) > {rtol}")
    if not a["kernel_launches"] or min(a["kernel_launches"].values()) == 0:
        problems.append(f"a Triton kernel did not run with kernels=triton: {a['kernel_launches']}")
    if b["kernel_launches"] and max(b["kernel_launches"].values()) > 0:
        problems.append(f"Triton kernels ran with kernels=torch: {b['kernel_launches']}")
    if problems:
        rec.update(status="failed", reason="; ".join(problems))


def _fmt(v, spec="{:.3g}"):
    return "-" if v is None else spec.format(v)


def write_summary(r: Runner, results: dict) -> None:
    s = r.stages
    lines = [f"# GPU check — {results['device']}", "",
             f"{results['finished']} · `{results['command']}` · {'DRY RUN (CPU, tiny shapes)' if r.dry else 'GPU'}"
             f" · overall: **{'ok' if results['ok'] else 'FAILED'}** in {results['seconds']}s", "",
             "| stage | status | seconds | notes |", "|---|---|---|---|"]
    for name, rec in s.items():
        note = rec.get("reason") or rec.get("result") or ""
        lines.append(f"| {name} | {rec['status']} | {rec.get('seconds', '-')} | {note} |")
    if s.get("imports", {}).get("wheels_needed"):
        lines += ["", "Missing on this machine; an offline machine needs: " + ", ".join(WHEELS), "",
                  f"Install from a local wheel directory: `{INSTALL_HINT}`"]
    a, b = s.get("train_triton", {}), s.get("train_torch", {})
    lines += ["", "## Training (Qwen2.5-VL-shaped, random weights; median over steady-state steps)", "",
              "| | kernels: triton | kernels: torch |", "|---|---|---|"]
    for label, key, spec in (("steps", "steps", "{}"), ("final loss", None, "{:.4f}"),
                             ("tokens/s/GPU", "tokens_per_s_per_gpu", "{:.0f}"),
                             ("TFLOP/s/GPU", "tflops_per_gpu", "{:.1f}"), ("MFU", "mfu", "{:.1%}"),
                             ("step time (s)", "step_time_s", "{:.3f}"), ("peak memory (GB)", "peak_mem_gb", "{:.1f}")):
        get = (lambda x: x["losses"][-1] if x.get("losses") else None) if key is None else (lambda x: x.get(key))
        lines.append(f"| {label} | {_fmt(get(a), spec)} | {_fmt(get(b), spec)} |")
    c = s.get("compare_training", {})
    lines += ["", f"Loss agreement: max relative difference per step {_fmt(c.get('max_rel_loss_diff'), '{:.2e}')} "
              f"(tolerance {c.get('loss_rtol')}). Triton launches in step 1: {a.get('kernel_launches')}"]
    bk = s.get("bench_kernels", {})
    if bk.get("records"):
        lines += ["", f"## Kernels (`tools/bench_kernels.py --op all`, {bk['device']})", "",
                  "| workload | implementation | pass | ms | TFLOP/s | GB/s |", "|---|---|---|---|---|---|"]
        for x in bk["records"]:
            lines.append(f"| {x['workload']} | {x['impl']} | {x.get('pass') or '-'} | "
                         f"{x.get('skipped') or _fmt(x.get('ms'))} | {_fmt(x.get('tflops'))} | {_fmt(x.get('gbps'))} |")
    if s.get("bench_data", {}).get("images_per_s"):
        lines += ["", "## Image decode (`tools/bench_data.py`)", "", "| backend | images/s |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in s["bench_data"]["images_per_s"].items()]
    _atomic_write(os.path.join(r.out, "summary.md"), "\n".join(lines) + "\n")


def _atomic_write(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_dir")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, the same stages (for CI)")
    args = p.parse_args(argv)
    out = os.path.abspath(args.out_dir)
    os.makedirs(out, exist_ok=True)
    r = Runner(out, args.dry_run)
    stage_imports(r)
    stage_pytest(r)
    stage_bench_kernels(r)
    stage_bench_data(r)
    data = stage_dataset(r)
    for kernels in ("triton", "torch"):
        stage_train(r, data, kernels)
    stage_compare(r)
    failed = [n for n, rec in r.stages.items() if rec["status"] not in ("ok", "skipped")]
    results = {"ok": not failed, "failed": failed, "dry_run": r.dry,
               "device": r.stages["imports"].get("found", {}).get("device", "unknown"),
               "command": "bash tools/gpu_check.sh " + ("--dry-run " if r.dry else "") + args.out_dir,
               "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "seconds": round(time.monotonic() - r.start, 1), "stages": r.stages}
    _atomic_write(os.path.join(out, "results.json"), json.dumps(results, indent=1))
    write_summary(r, results)
    print(f"[gpu_check] {'ok' if not failed else 'FAILED: ' + ', '.join(failed)} — {out}/summary.md", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
