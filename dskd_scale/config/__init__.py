"""Typed run configuration: YAML + dotted overrides -> frozen dataclasses (see ``loader``)."""

from dskd_scale.config.loader import ConfigError, build_config, config_to_dict, load_config, save_config

__all__ = ["ConfigError", "build_config", "config_to_dict", "load_config", "save_config"]
