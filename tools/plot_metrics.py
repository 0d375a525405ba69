#!/usr/bin/env python
"""Plot a training run's metrics.jsonl: loss (and LR) and throughput against the iteration.

  python tools/plot_metrics.py RUN_DIR [--out PNG]       # default: RUN_DIR/metrics.png

Top panel: the loss (skipped NaN/Inf steps marked by red lines at their iterations, since their loss has no
value to plot) with the learning rate on a second axis. Bottom panel: real (unpadded) tokens/s per GPU and
TFLOP/s per GPU. A preference run (objective.name=preference) gets a third panel: the mean rewards
(beta * log-ratio) of chosen and rejected completions and their margin, with the reward accuracy on a second
axis, and its loss terms (preference, quality, generation) drawn thin in the loss panel. A resumed run may have logged some iterations twice (those after its last checkpoint); the
later record of an iteration wins. The PNG is written to a temporary name and renamed, so a reader never sees
half a file. A missing run directory or metrics.jsonl, an empty file, or a malformed line (named by file and
line number) exits 2 with `error: ...`.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys


class MetricsError(ValueError):
    pass


def _number(value) -> float:
    """A metric as a float (None, missing or non-numeric -> NaN)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return math.nan
    return float(value)


def read_metrics(path: str) -> list[dict]:
    """The records of a metrics.jsonl, one per iteration (the last one logged for it), sorted by iteration."""
    if not os.path.isfile(path):
        raise MetricsError(f"{path} not found (has the run logged an iteration yet?)")
    by_iteration: dict[int, dict] = {}
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            text = line.strip()
            if not text:
                raise MetricsError(f"{path} line {lineno}: empty line")
            try:
                record = json.loads(text)
            except json.JSONDecodeError as e:
                raise MetricsError(f"{path} line {lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(record, dict):
                raise MetricsError(f"{path} line {lineno}: expected a JSON object, got {type(record).__name__}")
            it = record.get("iteration")
            if isinstance(it, bool) or not isinstance(it, int):
                raise MetricsError(f"{path} line {lineno}: no integer 'iteration'")
            if "loss" not in record:
                raise MetricsError(f"{path} line {lineno}: no 'loss'")
            by_iteration[it] = record
    if not by_iteration:
        raise MetricsError(f"{path}: no records")
    return [by_iteration[i] for i in sorted(by_iteration)]


PREFERENCE_TERMS = (("loss_preference", "preference term"), ("loss_quality", "quality term (BCO)"),
                    ("loss_generation", "generation term (SFT)"))
REWARDS = (("rewards_chosen", "reward chosen", "tab:green"), ("rewards_rejected", "reward rejected", "tab:red"),
           ("rewards_margin", "margin", "tab:purple"))


def plot(records: list[dict], out: str, title: str) -> dict:
    """Write the PNG; returns the plotted curves, label -> y values (NaN where a record lacks the metric)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    its = [r["iteration"] for r in records]
    loss = [_number(r.get("loss")) for r in records]
    lr = [_number(r.get("lr")) for r in records]
    tokens = [_number(r.get("tokens_per_s_per_gpu")) for r in records]
    tflops = [_number(r.get("tflops_per_gpu")) for r in records]
    skipped = [r["iteration"] for r, v in zip(records, loss) if r.get("skipped_step") or not math.isfinite(v)]

    preference = any("rewards_accuracy" in r for r in records)
    fig, axes = plt.subplots(3 if preference else 2, 1, figsize=(10, 10.5 if preference else 7.5), sharex=True)
    ax_loss, ax_tp = axes[0], axes[1]
    curves = {"loss": loss, "learning rate": lr, "tokens/s/GPU (real tokens)": tokens, "TFLOP/s/GPU": tflops}
    ax_loss.plot(its, loss, color="tab:blue", lw=1.2, marker="." if len(its) <= 60 else None, label="loss")
    for key, label in PREFERENCE_TERMS if preference else ():
        curves[label] = [_number(r.get(key)) for r in records]
        ax_loss.plot(its, curves[label], lw=0.8, alpha=0.8, label=label)
    for i, it in enumerate(skipped):
        ax_loss.axvline(it, color="tab:red", lw=0.8, alpha=0.6, ls="--",
                        label=f"skipped step (NaN/Inf), {len(skipped)} in all" if i == 0 else None)
    ax_loss.set_ylabel("loss")
    ax_loss.grid(alpha=0.3)
    handles, labels = ax_loss.get_legend_handles_labels()
    if any(math.isfinite(v) for v in lr):
        ax_lr = ax_loss.twinx()
        ax_lr.plot(its, lr, color="tab:gray", lw=0.9, ls=":", label="learning rate")
        ax_lr.set_ylabel("learning rate", color="tab:gray")
        ax_lr.tick_params(axis="y", colors="tab:gray")
        ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
        h, lab = ax_lr.get_legend_handles_labels()
        handles, labels = handles + h, labels + lab
    ax_loss.legend(handles, labels, loc="upper right", fontsize=8)
    finite = [(it, v) for it, v in zip(its, loss) if math.isfinite(v)]
    last = f"last loss {finite[-1][1]:.4f} at iteration {finite[-1][0]}" if finite else "no finite loss"
    ax_loss.set_title(f"{title}: {len(its)} iterations, {last}", fontsize=10)

    ax_tp.plot(its, tokens, color="tab:green", lw=1.2, label="tokens/s/GPU (real tokens)")
    ax_tp.set_ylabel("tokens/s per GPU", color="tab:green")
    ax_tp.tick_params(axis="y", colors="tab:green")
    ax_tp.set_xlabel("iteration")
    ax_tp.grid(alpha=0.3)
    ax_fl = ax_tp.twinx()
    ax_fl.plot(its, tflops, color="tab:orange", lw=1.2, label="TFLOP/s/GPU")
    ax_fl.set_ylabel("TFLOP/s per GPU", color="tab:orange")
    ax_fl.tick_params(axis="y", colors="tab:orange")
    steady = [v for v in tokens[1:] if math.isfinite(v)]  # the first step includes warm-up
    mean = f"mean {sum(steady) / len(steady):.0f} tokens/s/GPU after the first step" if steady else "throughput"
    ax_tp.set_title(mean, fontsize=10)
    h1, l1 = ax_tp.get_legend_handles_labels()
    h2, l2 = ax_fl.get_legend_handles_labels()
    ax_tp.legend(h1 + h2, l1 + l2, loc="lower right", fontsize=8)

    if preference:
        ax_rw = axes[2]
        for key, label, color in REWARDS:
            curves[label] = [_number(r.get(key)) for r in records]
            ax_rw.plot(its, curves[label], color=color, lw=1.2, label=label)
        ax_rw.axhline(0.0, color="black", lw=0.5)
        ax_rw.set_ylabel("reward (beta * log-ratio)")
        ax_rw.grid(alpha=0.3)
        ax_acc = ax_rw.twinx()
        curves["reward accuracy"] = [_number(r.get("rewards_accuracy")) for r in records]
        ax_acc.plot(its, curves["reward accuracy"], color="tab:blue", lw=1.0, ls="--", label="reward accuracy")
        ax_acc.set_ylim(-0.02, 1.02)
        ax_acc.set_ylabel("accuracy (chosen reward > rejected)", color="tab:blue")
        acc = [v for v in curves["reward accuracy"] if math.isfinite(v)]
        ax_rw.set_title(f"rewards; last accuracy {acc[-1]:.3f}" if acc else "rewards", fontsize=10)
        h1, l1 = ax_rw.get_legend_handles_labels()
        h2, l2 = ax_acc.get_legend_handles_labels()
        ax_rw.legend(h1 + h2, l1 + l2, loc="upper left", fontsize=8)
        ax_tp.set_xlabel("")
        ax_rw.set_xlabel("iteration")

    fig.tight_layout()
    d = os.path.dirname(os.path.abspath(out))
    tmp = os.path.join(d, f".{os.path.basename(out)}.tmp-{os.getpid()}")
    try:
        fig.savefig(tmp, format="png", dpi=110)
        os.replace(tmp, out)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.remove(tmp)
    return curves


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", help="training run directory (holds metrics.jsonl)")
    p.add_argument("--out", default=None, help="PNG to write (default: RUN_DIR/metrics.png)")
    args = p.parse_args(argv)

    if not os.path.isdir(args.run_dir):
        print(f"error: run directory {args.run_dir!r} not found", file=sys.stderr)
        return 2
    out = args.out or os.path.join(args.run_dir, "metrics.png")
    if not os.path.isdir(os.path.dirname(os.path.abspath(out))):
        print(f"error: the directory of --out {out!r} does not exist", file=sys.stderr)
        return 2
    try:
        records = read_metrics(os.path.join(args.run_dir, "metrics.jsonl"))
    except MetricsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    curves = plot(records, out, os.path.basename(os.path.normpath(os.path.abspath(args.run_dir))))
    panels = "loss, throughput" + (", rewards" if "reward accuracy" in curves else "")
    print(f"wrote {out} ({len(records)} iterations; panels: {panels})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
