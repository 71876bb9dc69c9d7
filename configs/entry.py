"""What every absl entry point (train.py, serve.py) does around its work."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Mapping

from configs.errors import ConfigError


def run_entry_point(run: Callable[[], None]) -> None:
  """Log lines with their time, the libraries' loggers quiet, and a configuration error printed as
  one line (`ConfigError: ...`) with exit status 2, before anything is compiled."""
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
  for noisy in ("absl", "orbax", "jax"):
    logging.getLogger(noisy).setLevel(logging.WARNING)
  try:
    run()
  except ConfigError as err:
    print(f"ConfigError: {err}", file=sys.stderr, flush=True)
    sys.exit(2)


def compilation_cache_dir(flag: str, environ: Mapping[str, str]) -> str | None:
  """The directory to give JAX's persistent compilation cache (`flag`, with ~ expanded), or None to
  leave JAX's own setting: when JAX_COMPILATION_CACHE_DIR is set (it wins) or the flag is empty."""
  if environ.get("JAX_COMPILATION_CACHE_DIR") or not flag:
    return None
  return os.path.expanduser(flag)
