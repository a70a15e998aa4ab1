from setuptools import find_packages, setup

setup(
    name="lorafuse",
    version="0.1.0",
    description="Fused Triton kernels for training-free subject + style LoRA fusion in diffusion models",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["lorafuse", "lorafuse.*"]),
    package_data={"lorafuse": ["py.typed"]},  # the public API is annotated (PEP 561)
    python_requires=">=3.10",
    # torch first: on CPU machines install `torch==2.13.0` (CPU build) before this package so that
    # pip never resolves a multi-GB CUDA build for it.
    install_requires=["torch>=2.5", "triton>=3.2", "numpy", "safetensors"],
    extras_require={
        "test": ["pytest", "pytest-benchmark", "hypothesis", "pyyaml"],  # pyyaml: the sweep tests read YAML SPECs
        "diffusers": ["diffusers>=0.32", "transformers", "peft>=0.14", "safetensors", "accelerate", "tqdm"],
        "plot": ["matplotlib"],
        "sweep": ["pyyaml", "accelerate", "tqdm"],  # lorafuse sweep (with the diffusers extra; JSON SPECs need no yaml)
    },
    entry_points={"console_scripts": ["lorafuse=lorafuse.cli:main"]},
)
