"""What every absl entry point (train.py, serve.py) does around its work."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

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
