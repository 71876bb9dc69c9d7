"""The built-in corpus: the running Python's standard-library sources, so training needs no download.

One `.py` file is one document. Files are taken in sorted relative-path order, which makes the
corpus (and the train/validation split cut from its end) the same on every run of one Python build.
"""

from __future__ import annotations

import os
import sysconfig

from configs.errors import ConfigError

# Tests are repetitive fixtures and idlelib is GUI code; site-packages is not the standard library.
_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idlelib", "__pycache__"})


def stdlib_dir() -> str:
  return sysconfig.get_paths()["stdlib"]


def stdlib_files(root: str | None = None) -> list[tuple[str, str]]:
  """(relative posix path, absolute path) of every eligible `.py` file, sorted by relative path."""
  root = root or stdlib_dir()
  found = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS]
    for name in filenames:
      if name.endswith(".py"):
        full = os.path.join(dirpath, name)
        found.append((os.path.relpath(full, root).replace(os.sep, "/"), full))
  found.sort()
  return found


def _clip_utf8(text: str, max_bytes: int) -> str:
  # Cutting the bytes may split a character; dropping the partial one keeps the text valid.
  return text.encode("utf-8")[:max_bytes].decode("utf-8", errors="ignore")


def builtin_corpus(max_bytes: int, root: str | None = None) -> list[str]:
  """Standard-library sources, in sorted path order, until `max_bytes` UTF-8 bytes are taken.

  The last document is cut to fit, so the total is exactly min(max_bytes, size of all files).
  Files that are not valid UTF-8 are skipped. Returns a list of documents (str).
  """
  if max_bytes <= 0:
    raise ConfigError(f"data.max_corpus_bytes={max_bytes}: must be positive")
  files = stdlib_files(root)
  if not files:
    raise ConfigError(f"no .py files found under the standard library at {root or stdlib_dir()}")
  docs, used = [], 0
  for _, path in files:
    try:
      with open(path, encoding="utf-8") as f:
        text = f.read()
    except (UnicodeDecodeError, OSError):
      continue
    size = len(text.encode("utf-8"))
    if size == 0:
      continue
    if used + size > max_bytes:
      text = _clip_utf8(text, max_bytes - used)
      if text:
        docs.append(text)
      break
    docs.append(text)
    used += size
  return docs
