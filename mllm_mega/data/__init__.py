"""Data pipeline: WebDataset shards -> DALI/PIL decoding -> NaViT or fixed-size patches -> packed THD micro-batches.

Entry points (see loader.py): ``build_train_loader(cfg, dp_rank=, dp_size=)``, ``build_eval_samples(cfg)``,
``DataConfig`` (config.py). Imported lazily so that ``mllm_mega.data.packing`` stays light.
"""

__all__ = ["DataConfig", "build_train_loader", "build_eval_samples"]


def __getattr__(name):
    if name == "DataConfig":
        from mllm_mega.data.config import DataConfig

        return DataConfig
    if name in ("build_train_loader", "build_eval_samples"):
        from mllm_mega.data import loader

        return getattr(loader, name)
    raise AttributeError(f"module 'mllm_mega.data' has no attribute {name!r}")
