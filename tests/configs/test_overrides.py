"""`section.field=value` overrides: parsed by the field's type, unknown names rejected by name."""

import pytest

from configs import ConfigError, get_config


@pytest.mark.parametrize("preset,overrides,pattern", [
    ("nope", [], r"config preset 'nope' is unknown; choose one of \['1b', 'moe', 'small', 'tiny', 'tiny_moe'\]"),
    ("tiny", ["model.widht=3"], r"unknown field model.widht"),
    ("tiny", ["modle.d_model=3"], r"unknown section 'modle'"),
    ("tiny", ["model.d_model=big"], r"model.d_model='big': expected int"),
    ("tiny", ["model.tie_embeddings=maybe"], r"expected a boolean"),
    ("tiny", ["model.d_model"], r"expected section.field=value"),
])
def test_bad_overrides(preset, overrides, pattern):
  with pytest.raises(ConfigError, match=pattern):
    get_config(preset, overrides)


def test_overrides_parse_types():
  cfg = get_config("tiny", ["model.tie_embeddings=true", "optimizer.learning_rate=1e-4", "data.paths=a.txt,b.txt"])
  assert cfg.model.tie_embeddings is True and cfg.optimizer.learning_rate == 1e-4
  assert cfg.data.paths == ("a.txt", "b.txt")
