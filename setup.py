from setuptools import find_packages, setup

setup(
    name="shardlab",
    version="0.1.0",
    description="JAX/XLA SPMD research codebase: one Flax NNX model under any mix of parallelism.",
    python_requires=">=3.11",
    packages=find_packages(include=["configs*", "models*", "parallel*", "data*", "training*"]),
    py_modules=["train"],
)
