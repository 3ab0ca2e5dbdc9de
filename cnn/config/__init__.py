"""Typed configuration: dataclass schema <- YAML file <- command-line dotlist.

The schema (schema) has for every field a type, a default and a one-line doc (with its unit),
written once as the string under the field.  ``build()`` (load) merges ``--config FILE`` over the
schema and ``key.sub=value`` overrides over both, then checks values that omegaconf's type system
cannot express.  Any mistake raises ``ConfigError`` with a one-line message that names the key;
``train_ddp.py`` turns it into exit code 2 on every rank.  ``schema_keys()`` (keys) reads the field
docs back out of schema.py's source (``ast``), so ``--help`` and docs/configuration.md list every key
without a second copy of the docs, and an unknown key is answered with the key that was probably meant.
"""

from cnn.config.schema import PRECISIONS, SCHEDULES, COMPILE_MODES, WANDB_FORBIDDEN, WANDB_MODES, FAULT_KINDS, ConfigError, DataConfig, ModelConfig, TrainConfig, OptimConfig, RunConfig, DistConfig, CheckpointConfig, WandbConfig, Config  # noqa: F401
from cnn.config.keys import Key, schema_keys, sections, key_names, schema_help, suggest, unknown_key, check_key, split_argv, keys_epilog, _flat_keys  # noqa: F401
from cnn.config.load import load_file, build, from_dict, validate, parse_args, to_yaml, to_dict  # noqa: F401
