from setuptools import find_packages, setup

setup(
    name="shardlab",
    version="0.1.0",
    description="JAX/XLA SPMD research codebase: one Flax NNX model under any mix of parallelism.",
    python_requires=">=3.11",
    # Tested: JAX 0.10.2 (Python 3.11, CPU), 0.11.2 (GPU images) and 0.12.0.1 (Python 3.12, CPU).
    # requirements.txt pins one of them per Python version.
    install_requires=["jax>=0.10.2,<0.13", "flax>=0.12.8,<0.13", "optax", "orbax-checkpoint", "grain", "absl-py",
                      "numpy", "tokenizers", "safetensors", "tensorboardX"],
    packages=find_packages(include=["configs*", "models*", "parallel*", "data*", "training*"]),
    py_modules=["train"],
)
