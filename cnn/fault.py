"""Failure rehearsal and what proves recovery: inject a fault, record every step's batch.

``checkpoint.fault_step=K`` makes ``checkpoint.fault_rank`` fail at global step K
(``checkpoint.fault_kind``: SIGKILL itself, raise, or hang; or slow_save: every checkpoint write
from step K on waits ``checkpoint.fault_delay_s``, as on a slow shared filesystem), on the first attempt only (a restarted or requeued attempt runs through), so that
a test or a user can watch torchrun or SLURM recover.  ``train.record_samples``
logs a hash of each step's global batch, which a resumed run must reproduce.
"""

from __future__ import annotations

import hashlib
import os
import signal
import time

import torch
import torch.distributed as dist

from cnn import console
from cnn.config import CheckpointConfig


def first_attempt() -> bool:
    return (os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
            and os.environ.get("SLURM_RESTART_COUNT", "0") == "0")


def maybe_fault(cfg: CheckpointConfig, rank: int, step: int) -> None:
    """Fail here if this is the rehearsed step and rank, on the first attempt."""
    if not (cfg.fault_step and step == cfg.fault_step and rank == cfg.fault_rank and first_attempt()):
        return
    if cfg.fault_kind == "slow_save":
        return  # acted on by slow_save()
    console.warn(f"fault injection: rank {rank} {cfg.fault_kind}s at step {step}")  # this rank's own line
    if cfg.fault_kind == "kill":
        os.kill(os.getpid(), signal.SIGKILL)  # as the OOM killer would
    if cfg.fault_kind == "hang":
        while True:  # alive but never steps again (a deadlock, a stuck device): the peers' next
            time.sleep(3600)  # collective times out; a launcher has to kill this process
    raise RuntimeError(f"fault injection at step {step} (checkpoint.fault_step)")


def slow_save(cfg: CheckpointConfig, rank: int, step: int) -> None:
    """checkpoint.fault_kind=slow_save: before a checkpoint write of step >= fault_step, wait."""
    if cfg.fault_kind == "slow_save" and cfg.fault_step and step >= cfg.fault_step and rank == cfg.fault_rank \
            and first_attempt():
        console.warn(f"fault injection: rank {rank} delays the checkpoint write of step {step} by {cfg.fault_delay_s} s")
        time.sleep(cfg.fault_delay_s)


def samples_digest(idx: torch.Tensor, world_size: int) -> str:
    """Hash of the sorted global batch (all ranks' indices): equal at every world size (collective)."""
    gathered = [torch.empty_like(idx) for _ in range(world_size)]
    dist.all_gather(gathered, idx)
    union = torch.cat(gathered).sort().values.cpu().numpy().astype("<i8")
    return hashlib.sha1(union.tobytes()).hexdigest()[:16]
