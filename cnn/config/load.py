"""A Config from the schema <- a YAML file <- command-line overrides, checked where omegaconf's types
cannot; back to YAML and dicts; from a checkpoint's saved dict."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from cnn.distributed import launch_env
from cnn.config.keys import _flat_keys, check_key, key_names, keys_epilog, split_argv
from cnn.config.schema import COMPILE_MODES, Config, ConfigError, FAULT_KINDS, PRECISIONS, SCHEDULES, WANDB_FORBIDDEN, WANDB_MODES


def _one_line(exc: OmegaConfBaseException) -> str:
    """omegaconf's messages span several lines (full_key, object_type...): keep the gist."""
    msg = str(exc).splitlines()[0].strip()
    key = getattr(exc, "full_key", None)
    if key and "is not a ListConfig" in msg:  # e.g. wandb.tags=x
        return f"{key}: expects a list, e.g. {key}=[a,b]"
    return f"{key}: {msg}" if key and key not in msg else msg


def _normalize_overrides(overrides: Sequence[str], allowed: Iterable[str] | None = None) -> list[str]:
    """Accept `key=value` and `--key=value` (what `wandb agent` passes); check every key."""
    out = []
    for item, nxt in zip(overrides, [*overrides[1:], None]):
        key, eq, value = item.partition("=")
        key = key[2:] if key.startswith("--") else key
        if not eq:
            if key in key_names():  # `optim.lr 0.002`
                given = nxt if nxt is not None and "=" not in nxt else None
                raise ConfigError(f"override '{item}{' ' + given if given else ''}' has no '=': "
                                  f"write {key}={given or 'VALUE'}")
            raise ConfigError(f"override '{item}' is not of the form key=value")
        check_key(key, allowed)
        out.append(f"{key}={value}")
    return out


def load_file(path: Path) -> Any:
    """A --config file as an omegaconf mapping; ConfigError (one line, naming the file) for a file
    that is missing, not a file, unreadable, not UTF-8, not valid YAML, empty, or not a mapping."""
    import yaml  # omegaconf's own YAML library

    if not path.exists():
        raise ConfigError(f"config file '{path}' does not exist")
    if not path.is_file():
        raise ConfigError(f"config file '{path}' is not a file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"config file '{path}' is not UTF-8 text (not a YAML file?)") from None
    except OSError as exc:
        raise ConfigError(f"config file '{path}' cannot be read: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"config file '{path}' is not valid YAML ({where}{problem})") from None
    if data is None or data == {}:
        raise ConfigError(f"config file '{path}' holds no keys (leave out --config for the schema defaults)")
    if not isinstance(data, dict):
        raise ConfigError(f"config file '{path}' must hold a mapping of keys (e.g. 'train: {{epochs: 3}}'), "
                          f"not a {type(data).__name__}")
    loaded = OmegaConf.create(text)  # omegaconf's own YAML loader: reads 1e-3 as a float, as PyYAML does not
    return loaded


def build(config_file: str | os.PathLike | None = None, overrides: Sequence[str] = (), *,
          base: dict[str, Any] | None = None, allowed: Iterable[str] | None = None,
          world_size: int | None = None) -> Config:
    """Schema <- base (a saved config) <- file <- overrides, validated; raises ConfigError.

    `allowed` limits which keys the overrides may set (a command that reads the rest
    from a checkpoint); `world_size` is passed to validate().
    """
    schema = OmegaConf.structured(Config)
    try:
        layers: list[Any] = [schema]
        if base:
            layers.append(OmegaConf.create(base))
        if config_file:
            path = Path(config_file)
            loaded = load_file(path)
            for key in _flat_keys(OmegaConf.to_container(loaded)):
                try:
                    check_key(key)
                except ConfigError as exc:
                    raise ConfigError(f"{path}: {exc}") from None
            layers.append(loaded)
        layers.append(OmegaConf.from_dotlist(_normalize_overrides(overrides, allowed)))
        merged = OmegaConf.merge(*layers)
        cfg: Config = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except OmegaConfBaseException as exc:
        raise ConfigError(_one_line(exc)) from None
    validate(cfg, world_size)
    return cfg


def from_dict(saved: dict[str, Any]) -> Config:
    """A config saved by a run (a checkpoint's), as a Config; not re-validated (it was at
    training time, and checks such as checkpoint.resume's file need not hold here)."""
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), saved))  # type: ignore[return-value]
    except OmegaConfBaseException as exc:
        raise ConfigError(_one_line(exc)) from None


def _check(ok: bool, key: str, msg: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {msg}")


def validate(cfg: Config, world_size: int | None = None) -> None:
    """Impossible values, checked against the launch's world size (default: what the launcher
    detection, cnn.distributed.launch_env, finds; the same value setup() will use)."""
    if world_size is None:
        world_size = launch_env().world_size
    t, o, c, w = cfg.train, cfg.optim, cfg.checkpoint, cfg.wandb
    _check(cfg.precision in PRECISIONS, "precision", f"'{cfg.precision}' is not one of {', '.join(PRECISIONS)}")
    _check(cfg.device in ("auto", "cpu", "cuda"), "device", f"'{cfg.device}' is not one of auto, cpu, cuda")
    _check(t.epochs > 0, "train.epochs", f"must be > 0, got {t.epochs}")
    _check(t.batch_size >= 1, "train.batch_size", f"must be >= 1, got {t.batch_size}")
    _check(
        t.batch_size % world_size == 0,
        "train.batch_size",
        f"global batch {t.batch_size} is not divisible by the world size {world_size}",
    )
    _check(t.max_steps >= 0, "train.max_steps", f"must be >= 0, got {t.max_steps}")
    _check(t.eval_batch_size >= 1, "train.eval_batch_size", f"must be >= 1, got {t.eval_batch_size}")
    _check(t.eval_every >= 0, "train.eval_every", f"must be >= 0, got {t.eval_every}")
    _check(t.log_every >= 1, "train.log_every", f"must be >= 1, got {t.log_every}")
    _check(t.compile_mode in COMPILE_MODES, "train.compile_mode",
           f"'{t.compile_mode}' is not one of {', '.join(COMPILE_MODES)}")
    _check(t.threads >= 0, "train.threads", f"must be >= 0, got {t.threads}")
    _check(
        t.profile_steps == [] or (len(t.profile_steps) == 2 and 1 <= t.profile_steps[0] <= t.profile_steps[1]),
        "train.profile_steps",
        f"must be [] or [START, END] with 1 <= START <= END, got {list(t.profile_steps)}",
    )
    _check(t.debug_delay_ms >= 0, "train.debug_delay_ms", f"must be >= 0, got {t.debug_delay_ms}")
    _check(
        0 <= t.debug_delay_rank < world_size,
        "train.debug_delay_rank",
        f"{t.debug_delay_rank} is not a rank of world size {world_size}",
    )
    _check(0.0 <= cfg.model.dropout < 1.0, "model.dropout", f"must be in [0, 1), got {cfg.model.dropout}")
    _check(o.lr > 0, "optim.lr", f"must be > 0, got {o.lr}")
    _check(o.weight_decay >= 0, "optim.weight_decay", f"must be >= 0, got {o.weight_decay}")
    _check(o.muon_lr >= 0, "optim.muon_lr", f"must be >= 0 (0 = Adam only), got {o.muon_lr}")
    _check(o.muon_ns_steps >= 1, "optim.muon_ns_steps", f"must be >= 1, got {o.muon_ns_steps}")
    _check(0.0 <= o.label_smoothing < 1.0, "optim.label_smoothing", f"must be in [0, 1), got {o.label_smoothing}")
    _check(o.schedule in SCHEDULES, "optim.schedule", f"'{o.schedule}' is not one of {', '.join(SCHEDULES)}")
    _check(0.0 <= o.warmup_frac < 1.0, "optim.warmup_frac", f"must be in [0, 1), got {o.warmup_frac}")
    _check(cfg.data.test_subset >= 0, "data.test_subset", f"must be >= 0, got {cfg.data.test_subset}")
    _check(cfg.data.train_subset >= 0, "data.train_subset", f"must be >= 0, got {cfg.data.train_subset}")
    _check(
        cfg.data.train_subset == 0 or cfg.data.train_subset >= t.batch_size,
        "data.train_subset",
        f"{cfg.data.train_subset} images make no full global batch of {t.batch_size}",
    )
    _check(cfg.dist.timeout_s >= 1, "dist.timeout_s", f"must be >= 1, got {cfg.dist.timeout_s}")
    _check(cfg.dist.init_timeout_s >= cfg.dist.timeout_s, "dist.init_timeout_s",
           f"must be >= dist.timeout_s ({cfg.dist.timeout_s}), got {cfg.dist.init_timeout_s}")
    _check(cfg.dist.data_timeout_s >= 1, "dist.data_timeout_s", f"must be >= 1, got {cfg.dist.data_timeout_s}")
    _check(c.every_steps >= 0, "checkpoint.every_steps", f"must be >= 0, got {c.every_steps}")
    _check(c.keep >= 1, "checkpoint.keep", f"must be >= 1, got {c.keep}")
    _check(c.fault_step >= 0, "checkpoint.fault_step", f"must be >= 0, got {c.fault_step}")
    _check(
        0 <= c.fault_rank < world_size,
        "checkpoint.fault_rank",
        f"{c.fault_rank} is not a rank of world size {world_size}",
    )
    _check(c.fault_kind in FAULT_KINDS, "checkpoint.fault_kind",
           f"'{c.fault_kind}' is not one of {', '.join(FAULT_KINDS)}")
    _check(c.fault_delay_s >= 0, "checkpoint.fault_delay_s", f"must be >= 0, got {c.fault_delay_s}")
    _check(c.save_timeout_s >= 1, "checkpoint.save_timeout_s", f"must be >= 1, got {c.save_timeout_s}")
    # A checkpoint path is checked where it is read, on rank 0 (cnn.checkpoint.resume): other
    # nodes need not see the file, and their error arrives with rank 0's broadcast.
    _check(c.resume.strip() != "", "checkpoint.resume", "must be auto, never or a checkpoint path")
    _check(w.mode in WANDB_MODES, "wandb.mode", f"'{w.mode}' is not one of {', '.join(WANDB_MODES)}")
    for key, value in (("wandb.project", w.project), ("wandb.entity", w.entity), ("wandb.group", w.group)):
        # W&B refuses these at init (wandb/sdk/wandb_settings.py: project names "cannot contain characters
        # '/,\\,#,?,%,:'"; names of up to 128 characters): say so now, naming the key
        bad = sorted(set(value) & set(WANDB_FORBIDDEN))
        _check(not bad, key, f"'{value}' cannot contain {' '.join(bad)} (W&B forbids {' '.join(WANDB_FORBIDDEN)})")
        _check(len(value) <= 128, key, f"is {len(value)} characters long; W&B allows 128")
    _check(
        w.log_every >= 0 and w.log_every % t.log_every == 0,
        "wandb.log_every",
        f"must be 0 or a multiple of train.log_every ({t.log_every}), got {w.log_every}",
    )
    _check(w.init_timeout_s >= 1, "wandb.init_timeout_s", f"must be >= 1, got {w.init_timeout_s}")


def parse_args(argv: Sequence[str] | None = None) -> Config:
    """`[--config FILE] [key=value ...]` -> validated Config."""
    parser = argparse.ArgumentParser(
        description="Train the MNIST CNN with DistributedDataParallel. Precedence: schema defaults "
                    "<- --config FILE.yaml <- key=value overrides.",
        epilog=keys_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", help="YAML file layered over the schema defaults")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, applied last (see below)")
    args, overrides = split_argv(parser, argv)
    return build(args.config, overrides)


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(cfg: Config) -> dict[str, Any]:
    return OmegaConf.to_container(OmegaConf.structured(cfg))  # type: ignore[return-value]
