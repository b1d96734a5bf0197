"""Installs the scan_dist package; kernels/ is installed as scan_dist.kernels."""
from setuptools import setup

setup(
    name="scan_dist",
    version="0.1.0",
    description="Distributed, GPU-fast SCAN: learning to classify images without labels",
    python_requires=">=3.10",
    packages=[
        "scan_dist",
        "scan_dist.stages",
        "scan_dist.data",
        "scan_dist.models",
        "scan_dist.distributed",
        "scan_dist.data.formats",
        "scan_dist.kernels",
        "scan_dist.slurm_profiles",
    ],
    package_dir={"scan_dist.kernels": "kernels", "scan_dist.slurm_profiles": "slurm/profiles"},
    package_data={
        "scan_dist": ["presets/*.yaml"],
        "scan_dist.data": ["imagenet_subsets/*.txt", "imagenet_subsets/*.md"],
        "scan_dist.slurm_profiles": ["*.yaml"],
    },
    install_requires=[
        # Oldest pair the kernel tests ran on: torch 2.11 (which pins Triton 3.6) with its torchvision 0.26, the
        # stack of a current CUDA 13 cluster image; the whole suite runs on the versions the Makefile pins.
        "torch>=2.11",
        "torchvision>=0.26",
        "numpy",
        "omegaconf>=2.3",
        "tqdm",
        "scipy",
        "scikit-learn",
        "matplotlib",
        "pillow",
        "pyyaml",
        "submitit",
    ],
    extras_require={
        "test": ["pytest", "faiss-cpu", "deepspeed"],
        "faiss": ["faiss-cpu"],
        "dali": ["nvidia-dali-cuda130"],
        "tensorboard": ["tensorboard"],
    },
)
