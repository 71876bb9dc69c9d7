"""`section.field=value` strings -> a new `Config`, with values parsed by the field's declared type."""

from __future__ import annotations

import dataclasses
import typing

from configs.base import Config
from configs.errors import ConfigError


def _parse(text: str, typ, key: str):
  if typ is bool:
    low = text.lower()
    if low in ("1", "true", "yes", "on"):
      return True
    if low in ("0", "false", "no", "off"):
      return False
    raise ConfigError(f"{key}={text!r}: expected a boolean (true/false)")
  if typ in (int, float, str):
    try:
      return typ(text)
    except ValueError:
      raise ConfigError(f"{key}={text!r}: expected {typ.__name__}") from None
  if typing.get_origin(typ) is tuple:
    return tuple(p for p in text.split(",") if p)
  raise ConfigError(f"{key}: fields of type {typ} cannot be overridden from a string")


def apply_overrides(config: Config, overrides: list[str] | tuple[str, ...]) -> Config:
  """Applies overrides such as `model.d_model=256` or `mesh.fsdp=4`, in order."""
  for item in overrides:
    if "=" not in item:
      raise ConfigError(f"override {item!r}: expected section.field=value")
    key, text = item.split("=", 1)
    parts = key.strip().split(".")
    if len(parts) != 2:
      raise ConfigError(f"override {item!r}: expected section.field=value")
    section_name, field_name = parts
    if section_name not in {f.name for f in dataclasses.fields(Config)} or section_name == "name":
      raise ConfigError(f"override {item!r}: unknown section {section_name!r}")
    section = getattr(config, section_name)
    hints = typing.get_type_hints(type(section))
    if field_name not in hints:
      known = ", ".join(sorted(hints))
      raise ConfigError(f"override {item!r}: unknown field {section_name}.{field_name} (known: {known})")
    value = _parse(text.strip(), hints[field_name], key)
    config = dataclasses.replace(config, **{section_name: dataclasses.replace(section, **{field_name: value})})
  return config
