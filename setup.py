from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent

setup(
    name="imagen_lib",
    version="0.1.0",
    description="Cascaded text-to-image diffusion (Imagen) for research: networks, diffusion maths, cascade, trainer.",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="MIT",
    packages=find_packages(include=["imagen_lib", "imagen_lib.*"]),
    python_requires=">=3.10",
    install_requires=[
        # torch is pinned by nobody here: install the build you want first
        # (CPU: `pip install torch==2.13.0`), any torch >= 2.1 satisfies this.
        "torch>=2.1",
        "einops>=0.7",
        "transformers>=4.40",
        "accelerate>=0.30",
        "ema-pytorch>=0.4",
        "fsspec>=2023.1",
        "kornia>=0.7",
        "tqdm>=4.60",
        "beartype>=0.16",
        "safetensors>=0.4",
        "pillow>=9.0",
        "pyyaml>=6.0",
        "numpy>=1.23",
    ],
    extras_require={
        "webdataset": ["webdataset>=0.2.80"],
        "tensorboard": ["tensorboard>=2.12"],
        "latent": ["diffusers>=0.30"],
        "lora": ["peft>=0.10"],
        "test": [
            "pytest>=7",
            "hypothesis>=6.0",
            "ruff>=0.5",
            "nbclient>=0.7",
            "nbformat>=5.7",
            "ipykernel>=6.0",
            "webdataset>=0.2.80",
            "sentencepiece>=0.1.99",
            "tensorboard>=2.12",
            "diffusers>=0.30",
            "peft>=0.10",
        ],
    },
    entry_points={"console_scripts": ["imagen-lib=imagen_lib.cli:entry_point"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "License :: OSI Approved :: MIT License",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
