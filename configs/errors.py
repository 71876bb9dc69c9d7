"""The one error type for a configuration that breaks a rule."""


class ConfigError(ValueError):
  """A configuration value breaks a rule. The message names the field, the value and the rule."""


class MissingFileError(ConfigError, FileNotFoundError):
  """A file the configuration names does not exist."""
