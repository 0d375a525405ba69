"""The training loop: data -> micro-batches -> step -> log -> checkpoint, with resume, signals and a NaN guard.

Checkpoint ``run_dir/checkpoints/iter_XXXXXXX`` holds (megatron dist checkpoint) the model and the
distributed optimizer's state, both resharded on load at another TP/PP; plus ``extra/``: ``train_state.json``
(iteration, consumed samples, LR scheduler, counters, layout, the objective's state such as BCO's running
delta), ``data_dp{d}.json`` (each data-parallel rank's loader state) and ``rng_rank{r}.pt``
(Python/NumPy/torch/CUDA and megatron's tracker RNG states). Resuming at the same layout continues bit-identically (the resume test compares losses and grad norms exactly).

SIGTERM / SIGUSR1 (SLURM's warning before the time limit, then ``--requeue``) set a flag; at the next step
boundary every rank agrees on it, the run saves and exits 0, and the requeued job resumes automatically.
"""
from __future__ import annotations

import json
import os
import random
import signal
import time

import numpy as np
import torch
import torch.distributed as dist

from mllm_mega.config import Config
from mllm_mega.models.common.kernel_choice import resolve_kernels
from mllm_mega.objectives import build_objective, build_resident_reference
from mllm_mega.training import checkpointing as ckpt
from mllm_mega.training import integrity, resume, setup
from mllm_mega.training.flops import device_peak_tflops, pack_flops, training_multipliers
from mllm_mega.training.metrics import MetricsLogger, Timer, peak_memory_gb
from mllm_mega.training.step import train_step


class NaNStop(RuntimeError):
    """Too many consecutive steps with NaN/Inf loss or gradients."""


class Trainer:
    def __init__(self, cfg: Config):
        from megatron.core import parallel_state as ps

        from mllm_mega.data.loader import build_train_loader
        from mllm_mega.data.text import TextProcessor
        from mllm_mega.models import registry

        self.cfg = cfg
        self._stop_signal = None
        self._install_signal_handlers()  # before the (long) build and load: an early signal is kept, not fatal
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.dp_rank, self.dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
        # context parallel: CP ranks share a DP rank's data; loss weights and gradients sum over DP x CP
        self.dp_group = ps.get_data_parallel_group(with_context_parallel=True)
        self.ckpt_dir = os.path.join(cfg.run_dir, "checkpoints")
        gbs, mbs = cfg.train.global_batch_size, cfg.train.micro_batch_size
        if gbs % (mbs * self.dp_size):
            raise ValueError(f"train.global_batch_size={gbs} must be a multiple of train.micro_batch_size={mbs} "
                             f"x data-parallel size {self.dp_size}")
        self.num_microbatches = gbs // (mbs * self.dp_size)

        self.text = TextProcessor(cfg.data.tokenizer_dir)
        self.arch = setup.resolve_arch(cfg, self.text)
        self.dtype = setup.resolve_dtype(cfg)
        self.kernels = resolve_kernels(cfg.model.kernels)  # once, so the model and the loss slot agree
        self.spec = registry.spec_of(self.arch)
        self.model = self.spec.build_stage(self.arch, setup.layout_of(cfg), kernels=self.kernels, params_dtype=self.dtype,
                                 **setup.recompute_of(cfg))
        self.start_iteration = 0
        # collective: verifies the manifest; a bad latest checkpoint falls back to the newest intact one
        resume_from = resume.select_resume_iteration(self.ckpt_dir, log=self._print) \
            if cfg.checkpoint.resume and os.path.isdir(self.ckpt_dir) else None
        if resume_from is None and cfg.model.init_from:
            ckpt.load_model_weights(cfg.model.init_from, self.model)
            self._print(f"[train] initial weights from {cfg.model.init_from}")
        reference = None
        if cfg.objective.name == "preference" and cfg.objective.reference == "resident":
            # before any resume load: a random-init policy still holds its (seeded) starting weights here
            reference = build_resident_reference(cfg, self.spec, self.arch, setup.layout_of(cfg),
                                                 kernels=self.kernels, dtype=self.dtype, policy=self.model)
            self._print(f"[train] resident reference model from "
                        f"{cfg.objective.reference_from or cfg.model.init_from or 'the initial (random) weights'}")
        self.objective = build_objective(cfg, reference_model=reference)
        setup.apply_freeze(self.model, cfg)
        self.frozen = setup.frozen_groups(self.arch, cfg)
        self.ddp = setup.wrap_ddp(self.model, cfg)
        self.optimizer, self.scheduler = setup.build_optimizer(self.ddp, cfg, self.dtype)
        # same_data_at_any_dp (testing aid): every rank reads the DP-1 stream and keeps its share of each batch
        self.shared_stream = cfg.train.same_data_at_any_dp and self.dp_size > 1
        loader_dp = (0, 1) if self.shared_stream else (self.dp_rank, self.dp_size)
        self.loader = build_train_loader(cfg.data, dp_rank=loader_dp[0], dp_size=loader_dp[1],
                                         **self.spec.loader_options(self.arch))
        self.consumed_samples, self.nan_skipped_steps, self.nan_in_a_row = 0, 0, 0
        self.async_queue = None
        async_save = cfg.checkpoint.async_save
        if async_save == "true" or (async_save == "auto" and torch.cuda.is_available()):
            from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

            self.async_queue = AsyncCallsQueue()
        if resume_from is not None:
            self._load(resume_from)
        self.multipliers = training_multipliers(self.frozen)
        self.peak_tflops = device_peak_tflops(cfg.logging.peak_tflops)
        self.stopped_early = False  # signal or exit_interval; the same on every rank (agreed at a step boundary)
        self._print(f"[train] {self.arch.family} | layout tp={cfg.parallel.tp} pp={cfg.parallel.pp} cp={cfg.parallel.cp} "
                    f"dp={self.dp_size} | stage {cfg.stage.name} (frozen: "
                    f"{[k for k, v in self.frozen.items() if v] or 'none'}) | dtype {str(self.dtype)[6:]} | "
                    f"kernels {self.kernels} | {self.num_microbatches} micro-batch(es) of {mbs} pack(s) x "
                    f"{cfg.data.seq_len} tokens per DP rank and step")

    # --- helpers -----------------------------------------------------------------------------------
    def _print(self, msg: str) -> None:
        if self.rank == 0:
            print(msg, flush=True)

    def _is_data_writer(self) -> bool:
        from megatron.core import parallel_state as ps

        return ps.get_tensor_model_parallel_rank() == 0 and ps.get_pipeline_model_parallel_rank() == 0 \
            and ps.get_context_parallel_rank() == 0  # context parallel: CP peers hold the same loader state

    def _sharded_state_dict(self, is_loading: bool, sharding: str | None = None) -> dict:
        model_sd = self.model.sharded_state_dict(prefix="")
        meta = {"distrib_optim_sharding_type": sharding or self.cfg.checkpoint.optimizer_sharding}
        return {"model": model_sd,
                "optimizer": self.optimizer.sharded_state_dict(model_sd, is_loading=is_loading, metadata=meta)}

    def _layout(self) -> dict:
        layout = {"tp": self.cfg.parallel.tp, "pp": self.cfg.parallel.pp, "dp": self.dp_size, "world": self.world}
        if self.cfg.parallel.cp > 1:  # context parallel (absent at CP=1: older checkpoints compare equal)
            layout["cp"] = self.cfg.parallel.cp
        return layout

    # --- checkpoints ---------------------------------------------------------------------------------
    def save(self, iteration: int) -> None:
        """Collective save of everything a resume needs (model only at iteration 0: no optimizer state yet)."""
        ckpt.finalize_async_saves(self.async_queue, blocking=True)
        if self.cfg.parallel.overlap_param_gather:  # the last step's update is not gathered until a forward
            self.ddp.start_param_sync(force_sync=True)
        self._check_finite_state(iteration)
        if self.rank == 0:
            ckpt.write_meta(self.ckpt_dir, {"hf_config": self.arch.hf_config, "source_dtype": str(self.dtype)[6:],
                                            "source": f"training run {os.path.abspath(self.cfg.run_dir)}"})
            self._copy_tokenizer()
        train_state = {
            "iteration": iteration, "consumed_samples": self.consumed_samples,
            "nan_skipped_steps": self.nan_skipped_steps, "nan_in_a_row": self.nan_in_a_row,
            "scheduler": self.scheduler.state_dict(), "layout": self._layout(),
            "optimizer_sharding": self.cfg.checkpoint.optimizer_sharding,
            "adam_step": _adam_step(self.optimizer),
            "model_only": iteration == 0,
            "objective": self.objective.state_dict(),  # e.g. BCO's running delta: restored for an exact resume
        }
        loader_state = self.loader.state_dict() if self._is_data_writer() else None

        def write_extra(tmp: str) -> None:
            extra = os.path.join(tmp, "extra")
            os.makedirs(extra, exist_ok=True)
            torch.save(_rng_state(), os.path.join(extra, f"rng_rank{self.rank}.pt"))
            if loader_state is not None:
                with open(os.path.join(extra, f"data_dp{self.dp_rank}.json"), "w") as f:
                    json.dump(loader_state, f)
            if self.rank == 0:
                with open(os.path.join(extra, "train_state.json"), "w") as f:
                    json.dump(train_state, f, indent=1)

        t = time.perf_counter()
        sharded = (ckpt.model_sharded_state_dict(self.model) if iteration == 0
                   else self._sharded_state_dict(is_loading=False))
        ckpt.save_checkpoint(self.ckpt_dir, iteration, sharded,
                             keep_last=self.cfg.checkpoint.keep_last, write_extra=write_extra,
                             async_queue=self.async_queue)
        kind = "scheduled async save of" if self.async_queue is not None else "saved"
        hashing = "" if self.async_queue is not None else f", manifest {ckpt.last_save_stats['manifest_s']:.3f}s"
        self._print(f"[train] {kind} {ckpt.iter_dir(self.ckpt_dir, iteration)} ({time.perf_counter() - t:.3f}s"
                    f"{hashing})")

    def _check_finite_state(self, iteration: int) -> None:
        """Collective: refuse to save weights or optimizer state holding NaN/Inf as a good checkpoint."""
        bad = integrity.nonfinite_state(self.model, self.optimizer)
        flag = torch.tensor([0.0 if bad is None else 1.0])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() > 0:
            last = ckpt.latest_good_hint(self.ckpt_dir)
            raise NaNStop(f"iteration {iteration}: NaN/Inf in the weights or optimizer state"
                          f"{f' ({bad} on rank {self.rank})' if bad else ' (on another rank)'}; not saving it as a "
                          f"checkpoint; the last good checkpoint is {last}")

    def _copy_tokenizer(self) -> None:
        """ROOT/hf_extra: the tokenizer files and an image processor config matching the data settings, so
        an exported checkpoint loads with AutoProcessor."""
        import shutil

        src, dst = self.cfg.data.tokenizer_dir, os.path.join(self.ckpt_dir, "hf_extra")
        if os.path.isdir(dst) or not os.path.isdir(src):
            return
        tmp = dst + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        # the tokenizer dir may be a whole HF model dir: its weights are not tokenizer files
        shutil.copytree(src, tmp, ignore=shutil.ignore_patterns("*.safetensors", "*.bin", "*.index.json", "*.pt"))
        config = self.spec.processor_config(self.arch, self.cfg.data)  # None for a text-only model
        if config is not None and not os.path.isfile(os.path.join(tmp, "preprocessor_config.json")):
            with open(os.path.join(tmp, "preprocessor_config.json"), "w") as f:
                json.dump(config, f, indent=2)
        os.replace(tmp, dst)

    def _load(self, iteration: int) -> None:
        path = ckpt.iter_dir(self.ckpt_dir, iteration)
        extra = os.path.join(path, "extra")
        ts = resume.read_json(os.path.join(extra, "train_state.json"), "train state")
        saved, now = ts["layout"], self._layout()
        # context parallel: the distributed optimizer shards over DP x CP, so a CP change is a reshard too
        if ts["optimizer_sharding"] == "dp_reshardable" and (saved["tp"], saved["pp"], saved.get("cp", 1)) != (
                now["tp"], now["pp"], now.get("cp", 1)):
            raise ValueError(
                f"{path}: its optimizer state was saved with checkpoint.optimizer_sharding=dp_reshardable at "
                f"tp={saved['tp']} pp={saved['pp']} cp={saved.get('cp', 1)} and cannot be loaded at tp={now['tp']} "
                f"pp={now['pp']} cp={now.get('cp', 1)}; save "
                "with fully_reshardable, or start a new run with model.init_from (weights reshard at any layout)")
        if ts.get("model_only"):
            with torch.no_grad():
                ckpt.load_model_weights(path, self.model)
        else:
            groups = _group_hparams(self.optimizer)  # before loading: the load writes into the live groups
            _materialize_optimizer_state(self.optimizer)
            state = ckpt.load_checkpoint(path, self._sharded_state_dict(is_loading=True,
                                                                        sharding=ts["optimizer_sharding"]),
                                         verify=False)  # verified when it was selected
            with torch.no_grad():  # fp32 main params are views of the parameters
                self.model.load_state_dict(state["model"], strict=True)
                self.optimizer.load_state_dict(state["optimizer"])
            # megatron matches saved param groups to ours by position among groups of equal weight decay, which
            # can swap the per-module LR multipliers: the config is the source of truth for group hyperparameters
            _set_group_hparams(self.optimizer, groups)
            _set_adam_step(self.optimizer, ts["adam_step"])
        self.scheduler.load_state_dict(ts["scheduler"])
        self.objective.load_state_dict(ts.get("objective", {}))
        self.start_iteration = ts["iteration"]
        self.consumed_samples = ts["consumed_samples"]
        self.nan_skipped_steps, self.nan_in_a_row = ts["nan_skipped_steps"], ts["nan_in_a_row"]
        same_layout = ts["layout"] == self._layout()
        data_path = os.path.join(extra, f"data_dp{self.dp_rank}.json")
        if ts["layout"]["dp"] == self.dp_size:
            self.loader.load_state_dict(resume.read_json(data_path, f"data-loader state of DP rank {self.dp_rank}"))
        else:
            raise ValueError(f"{path}: saved with data-parallel size {ts['layout']['dp']}, now {self.dp_size}; "
                             "the data-loader state cannot be split differently. Resume with the same DP size, "
                             "or start a new run with model.init_from pointing at this checkpoint")
        rng_path = os.path.join(extra, f"rng_rank{self.rank}.pt")
        if same_layout:
            _set_rng_state(resume.read_torch(rng_path, f"RNG states of rank {self.rank}"))
        else:
            self._print(f"[train] layout changed {ts['layout']} -> {self._layout()}: model and optimizer "
                        "resharded; RNG states re-seeded")
        self._print(f"[train] resumed from {path} (iteration {self.start_iteration}, "
                    f"{self.consumed_samples} samples consumed)")

    # --- signals -------------------------------------------------------------------------------------
    def _install_signal_handlers(self) -> None:
        def handler(signum, frame):
            self._stop_signal = signum

        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, handler)

    def _should_stop(self) -> bool:
        flag = torch.tensor([1.0 if self._stop_signal is not None else 0.0])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item() > 0)

    # --- the loop ------------------------------------------------------------------------------------
    def _next_microbatches(self) -> tuple[list[dict], float, dict]:
        mbs = self.cfg.train.micro_batch_size
        if self.shared_stream:  # the global batch in DP-1 order; this rank's contiguous share of it
            share = self.num_microbatches * mbs
            packs = [next(self.loader) for _ in range(share * self.dp_size)][self.dp_rank * share:][:share]
        else:
            packs = [next(self.loader) for _ in range(self.num_microbatches * mbs)]
        flops = sum(pack_flops(self.arch, p, self.multipliers) for p in packs)
        counts = {"real_tokens": sum(int(p["num_real_tokens"]) for p in packs),
                  "samples": sum(int(p["num_samples"]) for p in packs)}
        micro = [self.objective.collate(packs[i:i + mbs]) for i in range(0, len(packs), mbs)]
        return micro, flops, counts

    def train(self) -> int:
        cfg = self.cfg
        if self.rank == 0:  # rows after the resumed checkpoint are redone now: drop the first attempt's
            resume.truncate_metrics(cfg.run_dir, self.start_iteration)
        lg = cfg.logging
        wandb = {"project": lg.wandb_project, "entity": lg.wandb_entity, "name": lg.wandb_run_name,
                 "mode": lg.wandb_mode}
        logger = MetricsLogger(cfg.run_dir, log_interval=lg.log_interval, tensorboard=lg.tensorboard,
                               max_steps=cfg.train.max_steps, wandb=wandb, config=cfg.to_dict()) \
            if self.rank == 0 else None
        iteration, last_saved = self.start_iteration, self.start_iteration
        if cfg.checkpoint.save_initial and iteration == 0:
            self.save(0)
        try:
            while iteration < cfg.train.max_steps:
                if self._should_stop():
                    self.stopped_early = True
                    self._print(f"[train] received signal {self._stop_signal or '(on another rank)'}: saving "
                                f"at iteration {iteration} and exiting")
                    if iteration != last_saved:
                        self.save(iteration)
                    ckpt.finalize_async_saves(self.async_queue, blocking=True)
                    return 0
                timer = Timer()
                micro, flops, counts = self._next_microbatches()
                first_step = iteration == self.start_iteration
                launches_before = _launch_counts() if first_step else None
                iteration += 1
                result = train_step(self.ddp, self.optimizer, micro, kernels=self.kernels, dp_group=self.dp_group,
                                    arch=self.arch,  # context parallel: the split needs the placeholder ids
                                    objective=self.objective,
                                    inject_nan=iteration in cfg.train.inject_nan_at,
                                    inject_nan_grad=iteration in cfg.train.inject_nan_grad_at)
                launches = self._launches_since(launches_before, iteration) if first_step else None
                if result["skipped"]:
                    self.nan_skipped_steps += 1
                    self.nan_in_a_row += 1
                    self._print(f"[train] iteration {iteration}: NaN/Inf in loss or gradients, step skipped "
                                f"({self.nan_in_a_row} in a row, {self.nan_skipped_steps} in total)")
                else:
                    self.nan_in_a_row = 0
                    self.scheduler.step(increment=1)
                totals = torch.tensor([flops, counts["real_tokens"], counts["samples"]], dtype=torch.float64)
                if not self._is_data_writer():
                    totals.zero_()  # count each DP replica's data once
                dist.all_reduce(totals)
                self.consumed_samples += int(totals[2])
                step_time = timer.elapsed()
                if logger is not None:
                    record = self._record(iteration, result, totals, step_time)
                    if launches is not None:
                        record["kernel_launches"] = launches
                    logger.log(record)
                if self.nan_in_a_row >= cfg.train.max_consecutive_nan_steps:
                    raise NaNStop(
                        f"stopping: {self.nan_in_a_row} consecutive steps with NaN/Inf loss or gradients "
                        f"(train.max_consecutive_nan_steps={cfg.train.max_consecutive_nan_steps}); the last good "
                        f"checkpoint is {ckpt.latest_good_hint(self.ckpt_dir)}"
                        "; lower optimizer.lr or check the data")
                ckpt.finalize_async_saves(self.async_queue, blocking=False)
                if iteration % cfg.checkpoint.save_interval == 0:
                    self.save(iteration)
                    last_saved = iteration
                if cfg.train.exit_interval and iteration % cfg.train.exit_interval == 0:
                    self._print(f"[train] train.exit_interval={cfg.train.exit_interval}: exiting at iteration "
                                f"{iteration}; run the same command again to continue")
                    self.stopped_early = True  # a planned stop: no end-of-run evaluation
                    break
            if (cfg.checkpoint.save_on_exit or self.stopped_early) and iteration != last_saved:
                self.save(iteration)
            ckpt.finalize_async_saves(self.async_queue, blocking=True)
        finally:
            if logger is not None:
                logger.close()
        self._print(f"[train] finished {iteration} iterations ({self.consumed_samples} samples)")
        return 0

    def _record(self, iteration: int, result: dict, totals: torch.Tensor, step_time: float) -> dict:
        flops, real_tokens = float(totals[0]), float(totals[1])
        tflops_per_gpu = flops / step_time / self.world / 1e12
        return {
            "iteration": iteration,
            "loss": result["loss"],
            "grad_norm": result["grad_norm"],
            "lr": self.scheduler.get_lr({}),  # the base schedule (modules scale it by their lr_mult)
            "loss_weight_sum": result["weight_sum"],
            "skipped_step": bool(result["skipped"]),
            "nan_skipped_steps": self.nan_skipped_steps,
            "real_tokens": int(real_tokens),
            "consumed_samples": self.consumed_samples,
            "step_time_s": step_time,
            "tokens_per_s_per_gpu": real_tokens / step_time / self.world,
            "tflops_per_gpu": tflops_per_gpu,
            "mfu": tflops_per_gpu / self.peak_tflops if self.peak_tflops else None,
            "peak_mem_gb": peak_memory_gb(),
            "skipped_samples": dict(self.loader.skip_counts),
            "samples_per_dataset": self.loader.stats.get("per_dataset", {}),  # data.datasets mixtures; rank 0's
            **{k: v for k, v in result.items() if k not in _STEP_KEYS},  # the objective's metrics
        }

    def _launches_since(self, before: dict, iteration: int) -> dict:
        """Triton kernel launches of one step, summed over all ranks, printed once: a slot that fell back to
        torch shows as 0 (``kernels: torch`` gives all zeros)."""
        from mllm_mega.kernels import KERNEL_NAMES

        now = _launch_counts()
        counts = torch.tensor([now[k] - before[k] for k in KERNEL_NAMES], dtype=torch.int64)
        dist.all_reduce(counts)
        launches = dict(zip(KERNEL_NAMES, (int(n) for n in counts.tolist())))
        self._print(f"[train] Triton kernel launches in iteration {iteration} (all ranks): "
                    + " ".join(f"{k}={v}" for k, v in launches.items()))
        return launches

    def close(self) -> None:
        self.loader.close()


_STEP_KEYS = ("loss", "weight_sum", "grad_norm", "skipped")


def _launch_counts() -> dict:
    from mllm_mega.kernels import launch_counts

    return launch_counts()


def _materialize_optimizer_state(optimizer) -> None:
    """Give a fresh distributed optimizer its Adam state tensors so its sharded state dict can be built for
    loading (megatron steps it once on zero gradients; the loaded checkpoint then overwrites parameters and
    state)."""
    for sub in getattr(optimizer, "chained_optimizers", [optimizer]):
        if hasattr(sub, "_init_optimizer_states_with_dummy_values") and not sub.optimizer.state:
            with torch.no_grad():
                sub._init_optimizer_states_with_dummy_values()


_GROUP_KEYS = ("max_lr", "min_lr", "wd_mult")


def _param_groups(optimizer):
    return [g for sub in getattr(optimizer, "chained_optimizers", [optimizer]) for g in sub.optimizer.param_groups]


def _group_hparams(optimizer) -> list[dict]:
    return [{k: g[k] for k in _GROUP_KEYS if k in g} for g in _param_groups(optimizer)]


def _set_group_hparams(optimizer, hparams: list[dict]) -> None:
    for group, values in zip(_param_groups(optimizer), hparams, strict=True):
        group.update(values)


def _adam_step(optimizer) -> float | None:
    """Adam's step counter (bias correction); megatron's dp_reshardable format does not restore it."""
    steps = {float(st["step"]) for sub in getattr(optimizer, "chained_optimizers", [optimizer])
             for st in sub.optimizer.state.values() if "step" in st}
    if len(steps) > 1:
        raise RuntimeError(f"optimizer parameters disagree on Adam's step: {sorted(steps)}")
    return steps.pop() if steps else None


def _set_adam_step(optimizer, step: float | None) -> None:
    for sub in getattr(optimizer, "chained_optimizers", [optimizer]):
        for st in sub.optimizer.state.values():
            if step is None:
                st.pop("step", None)
            elif "step" in st:
                st["step"] = torch.tensor(float(step), dtype=torch.float32)


def _rng_state() -> dict:
    from megatron.core import tensor_parallel

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
             "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    from megatron.core import tensor_parallel

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])
