from setuptools import setup

setup(
    name="shardlab",
    version="0.1.0",
    description="JAX/XLA SPMD research codebase: one Flax NNX model under any mix of parallelism.",
    python_requires=">=3.11",
    packages=["configs", "models", "parallel", "data", "training"],
    py_modules=["train"],
)
