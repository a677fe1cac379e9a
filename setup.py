"""adaptive_vision: adaptive-computation image classification in JAX/Flax."""

from setuptools import find_packages, setup

setup(
    name="adaptive_vision",
    version="0.1.0",
    description="RAViT resolution cascades and ERDE early-exit distillation in JAX/Flax",
    long_description=open("README.md").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["adaptive_vision", "adaptive_vision.*"]),
    # The C++ kernels are compiled on first use, for the machine (adaptive_vision/cpu/native).
    package_data={"adaptive_vision.cpu.native": ["*.cc", "*.h"]},
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.4.35,<0.11",
        "flax>=0.10,<0.13",
        "optax>=0.2.3,<0.3",
        "orbax-checkpoint>=0.10,<0.13",
        "ml-collections>=0.1.1,<2",
        "grain>=0.2.2,<0.3",
        "tensorflow-datasets>=4.9.6,<5",
        "numpy>=1.26",
        "pillow>=10",
        "matplotlib>=3.8",
        "tensorboardX>=2.6,<3",
        "absl-py>=1.4",
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-xdist>=3.5"],
        "bench": ["torch==2.13.0", "psutil>=5.9"],
    },
)
