"""The one primitive every check uses."""

from configs.errors import ConfigError


def require(ok: bool, message: str) -> None:
  """Raises `ConfigError(message)` unless `ok`; the message names field, value and rule."""
  if not ok:
    raise ConfigError(message)


def require_choice(value: str, choices: tuple[str, ...], field: str) -> None:
  require(value in choices, f"{field}={value!r}: choose one of {choices}")
