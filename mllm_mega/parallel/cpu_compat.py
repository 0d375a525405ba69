"""CPU compatibility layer for megatron-core (gloo, no CUDA). The only place that patches megatron-core.

megatron-core 0.16 assumes CUDA in a few places that our CPU path (tests, CI, the tiny demo) reaches:

1. RNG tracker: ``CudaRNGStatesTracker.add/fork`` read and write CUDA generator states. On CPU the tracked
   states are CPU generator states (only used for dropout/initialisation forks, which behave as on GPU).
2. ``torch.cuda.current_device()`` is called by p2p communication, the pipeline schedules and
   dist-checkpointing to place buffers; ``torch.cuda.synchronize()`` and CUDA streams by checkpointing. On CPU
   ``current_device`` returns the string ``"cpu"`` (a valid ``device=`` argument) and synchronize is a no-op.
3. The pipeline schedules, optimizer and checkpointing allocate tensors with ``device="cuda"`` or call
   ``.cuda()``. Inside megatron-core's modules (only there: the global ``torch`` functions are left alone, as
   other libraries such as transformers rely on them) the name ``torch`` is rebound to a proxy whose tensor
   factories map a CUDA device to the CPU; ``Tensor.cuda()`` returns the tensor itself.
4. The optimizers accept parameters by their legacy type string (``param.type() == "torch.cuda.FloatTensor"``).
   Called with no argument from a ``megatron.core.optimizer`` module, ``Tensor.type()`` of a CPU tensor
   answers with the CUDA name of its dtype; everywhere else it is unchanged.
5. gloo has no ``reduce_scatter``: megatron's sequence-parallel reduce-scatter is done as an all-reduce plus
   a local slice (same result; only used on CPU, where speed does not matter).

Apply once per process with :func:`apply` before building models; it is a no-op when CUDA is available.
"""
from __future__ import annotations

import functools
import sys
import types

import torch
import torch.distributed as dist

_APPLIED = False


def _cpu_device(device):
    if device is None:
        return None
    dev = torch.device(device) if not isinstance(device, int) else torch.device("cuda", device)
    return torch.device("cpu") if dev.type == "cuda" else dev


def _wrap_factory(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if "device" in kwargs:
            kwargs["device"] = _cpu_device(kwargs["device"])
        return fn(*args, **kwargs)

    return wrapper


_FACTORIES = ("empty", "zeros", "ones", "tensor", "full", "randn", "rand", "arange", "empty_like",
              "zeros_like", "ones_like", "full_like")

# megatron-core modules that allocate on "cuda" explicitly; imported before the proxy is installed.
_MEGATRON_MODULES = (
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.pipeline_parallel.p2p_communication",
    "megatron.core.dist_checkpointing.exchange_utils",
    "megatron.core.dist_checkpointing.strategies.state_dict_saver",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.optimizer.grad_scaler",
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.distrib_optimizer",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.tensor_parallel.data",
)


class _CpuTorch(types.ModuleType):
    """Stands for ``torch`` inside megatron-core modules: CUDA devices in tensor factories become CPU."""

    def __init__(self):
        super().__init__("torch")
        self._wrapped = {name: _wrap_factory(getattr(torch, name)) for name in _FACTORIES}

    def __getattr__(self, name):
        wrapped = self.__dict__.get("_wrapped", {})
        if name in wrapped:
            return wrapped[name]
        return getattr(torch, name)


def _install_torch_proxy():
    import importlib

    for name in _MEGATRON_MODULES:
        importlib.import_module(name)
    proxy = _CpuTorch()
    for name, mod in list(sys.modules.items()):
        if name.startswith("megatron.core") and getattr(mod, "torch", None) is torch:
            mod.torch = proxy
    torch.Tensor.cuda = lambda self, *a, **k: self


def _patch_rng_tracker():
    from megatron.core.tensor_parallel import random as mrandom

    def add(self, name, seed):
        self._is_initialized = True
        if seed in self.seeds_:
            raise Exception(f"seed {seed} already exists")
        self.seeds_.add(seed)
        if name in self.states_:
            raise Exception(f"rng state {name} already exists")
        gen = torch.Generator()
        gen.manual_seed(seed)
        self.states_[name] = gen.get_state()

    mrandom.CudaRNGStatesTracker.add = add
    mrandom._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    mrandom._set_cuda_rng_state = lambda state, *a, **k: torch.set_rng_state(state)


def _patch_reduce_scatter():
    """gloo lacks reduce_scatter: emulate it with all_reduce + slice for megatron's SP mappings."""
    orig = dist.reduce_scatter_tensor

    def reduce_scatter_tensor(output, input, op=dist.ReduceOp.SUM, group=None, async_op=False):
        if dist.get_backend(group) != "gloo":
            return orig(output, input, op=op, group=group, async_op=async_op)
        buf = input.clone()
        dist.all_reduce(buf, op=op, group=group)
        rank = dist.get_rank(group)
        n = output.shape[0]
        output.copy_(buf[rank * n:(rank + 1) * n])
        return None

    dist.reduce_scatter_tensor = reduce_scatter_tensor


def _patch_tensor_type():
    orig = torch.Tensor.type

    def type_(self, *args, **kwargs):
        result = orig(self, *args, **kwargs)
        if (not args and not kwargs and isinstance(result, str) and result.startswith("torch.")
                and not result.startswith("torch.cuda.")
                and sys._getframe(1).f_globals.get("__name__", "").startswith("megatron.core.optimizer")):
            return "torch.cuda." + result[len("torch."):]
        return result

    torch.Tensor.type = type_


def apply() -> None:
    """Neutralise megatron-core's CUDA assumptions when no GPU is present (idempotent)."""
    global _APPLIED
    if _APPLIED or torch.cuda.is_available():
        return
    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.set_device = lambda *a, **k: None
    _install_torch_proxy()
    _patch_rng_tracker()
    _patch_reduce_scatter()
    _patch_tensor_type()
    _APPLIED = True
