"""The run configuration: typed dataclasses + YAML + ``key=value`` overrides.

Import order: schema -> checks -> load -> help.
"""
from nest.config.schema import OptimConfig, RunConfig, TrainerConfig
from nest.config.checks import validate
from nest.config.load import find_config_file, load_config, load_model_config, to_yaml
from nest.config.help import describe, field_help
