"""Build for mllm_mega: one path for the Python packages and the C++ (pybind11) extensions (packer, patchify).

``kernels/`` is installed as ``mllm_mega.kernels`` (never a top-level ``kernels`` module).
"""
from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import find_packages, setup

ext_modules = [
    Pybind11Extension(
        "mllm_mega._packer",
        ["csrc/packer.cpp"],
        cxx_std=17,
        extra_compile_args=["-O3"],
    ),
    Pybind11Extension(
        "mllm_mega._patchify",
        ["csrc/patchify.cpp"],
        cxx_std=17,
        extra_compile_args=["-O3"],
    ),
]

setup(
    name="mllm_mega",
    version="0.1.0",
    description="Megatron-style training system for multimodal LLMs (Qwen2.5-VL family)",
    packages=find_packages(include=["mllm_mega", "mllm_mega.*"]) + ["mllm_mega.kernels"],
    package_dir={"mllm_mega.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass={"build_ext": build_ext},
    python_requires=">=3.10",
    # torch is deliberately not pinned to a range here: install torch first (see README), otherwise a
    # resolver may pull a multi-GB CUDA build on CPU-only machines.
    install_requires=[
        "torch>=2.6",
        "megatron-core==0.16.1",
        "transformers>=5.0",
        "safetensors",
        "numpy",
        "pyyaml",
        "tqdm",
        "psutil",
        "pillow",
        "webdataset",
        "tokenizers",
    ],
    extras_require={
        "gpu": ["triton", "nvidia-dali-cuda130"],
        "video": ["av"],
        "wandb": ["wandb"],
        "test": ["pytest", "hypothesis", "triton", "nvidia-dali-cuda130", "av", "matplotlib", "tensorboard",
                 "wandb"],
    },
)
