"""What the entry points do around their work: the compilation cache directory serve.py gives JAX."""

import os

from configs.entry import compilation_cache_dir


def test_compilation_cache_follows_the_flag_unless_the_environment_names_one():
  assert compilation_cache_dir("~/cache/jax", {}) == os.path.join(os.path.expanduser("~"), "cache", "jax")
  assert compilation_cache_dir("/srv/cache", {"HOME": "/x"}) == "/srv/cache"
  assert compilation_cache_dir("~/cache/jax", {"JAX_COMPILATION_CACHE_DIR": "/tmp/c"}) is None
  assert compilation_cache_dir("", {}) is None
