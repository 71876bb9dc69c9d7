"""Typed configuration for shardlab: dataclass sections, presets, overrides and validation."""

from configs.base import (CheckpointConfig, Config, DataConfig, DistillConfig, MeshConfig, ModelConfig,
                          OptimizerConfig, ShardingConfig, TrainConfig)
from configs.errors import ConfigError, MissingFileError
from configs.overrides import apply_overrides
from configs.presets import PRESETS
from configs.validate import resolve_mesh_sizes, validate


def get_config(preset: str, overrides: list[str] | tuple[str, ...] = ()) -> Config:
  """Builds a preset, applies `section.field=value` overrides. Validation needs the device count: see `validate`."""
  if preset not in PRESETS:
    raise ConfigError(f"config preset {preset!r} is unknown; choose one of {sorted(PRESETS)}")
  return apply_overrides(PRESETS[preset](), overrides)


__all__ = ["CheckpointConfig", "Config", "ConfigError", "DataConfig", "DistillConfig", "MeshConfig", "ModelConfig",
           "MissingFileError", "OptimizerConfig", "PRESETS", "ShardingConfig", "TrainConfig", "apply_overrides", "get_config",
           "resolve_mesh_sizes", "validate"]
