from setuptools import find_packages, setup

setup(
    name="lorafuse",
    version="0.1.0",
    description="Fused Triton kernels for training-free subject + style LoRA fusion in diffusion models",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["lorafuse", "lorafuse.*"]),
    package_data={"lorafuse": ["py.typed"]},  # the public API is annotated (PEP 561)
    # The tested range, no wider: every bound below is a stack of `python -m benchmarks.stack_check`
    # that CI runs (tests/test_versions.py keeps the two in step). torch 2.8 pins Triton 3.4, the oldest
    # Triton that takes the kernels' tuple constexprs; the newest are the newest releases tested.
    python_requires=">=3.10,<3.14",
    # torch first: on CPU machines install `torch==2.13.0` (CPU build) before this package so that
    # pip never resolves a multi-GB CUDA build for it.
    install_requires=["torch>=2.8,<2.15", "triton>=3.4,<3.10", "numpy", "safetensors"],
    extras_require={
        "test": ["pytest", "pytest-benchmark", "hypothesis", "pyyaml"],  # pyyaml: the sweep tests read YAML SPECs
        "diffusers": ["diffusers>=0.32", "transformers>=4.41.2", "peft>=0.14", "safetensors", "accelerate", "tqdm"],
        "plot": ["matplotlib"],
        "sweep": ["pyyaml", "accelerate", "tqdm"],  # lorafuse sweep (with the diffusers extra; JSON SPECs need no yaml)
    },
    entry_points={"console_scripts": ["lorafuse=lorafuse.cli:main"]},
)
