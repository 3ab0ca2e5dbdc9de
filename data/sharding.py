"""Device-resident MNIST, one normalization, and rank-aware sharding.

Every function here takes ``rank`` and ``world_size`` as arguments, so sharding
is tested without a process group.

Training order follows ``DistributedSampler`` (it produces the indices): every
epoch one permutation seeded by (seed, epoch), shared by all ranks; rank r takes
every world_size-th index starting at r.  Step s of an epoch then uses exactly
the global positions [s*B, (s+1)*B) of that permutation, whatever the world
size, because rank r's j-th image of step s sits at position (s*b + j)*W + r.
So a global batch holds the same images at every world size (B = global batch,
b = B / W per rank), and the incomplete last global batch of an epoch is dropped.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.data.distributed import DistributedSampler

MEAN, STD = 0.1307, 0.3081  # of the MNIST training pixels, on the 0..1 scale


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 N x 28 x 28 (0..255) -> float32 N x 1 x 28 x 28, zero mean, unit std.

    Training and evaluation both go through here, so they cannot drift apart.
    """
    return ((images.float() / 255.0 - MEAN) / STD).unsqueeze(1)


def model_input(images: torch.Tensor, device: torch.device, channels_last: bool = False) -> torch.Tensor:
    """uint8 N x 28 x 28 -> the model's input on `device`: normalized, in the memory format the
    model trained in.  Training, evaluation and prediction (cnn.inference) all come through here."""
    x = normalize(images.to(device))
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


@dataclass
class DeviceDataset:
    """Normalized images and labels living on the training device."""

    images: torch.Tensor  # float32 N x 1 x 28 x 28
    labels: torch.Tensor  # int64 N

    @classmethod
    def from_uint8(cls, images: torch.Tensor, labels: torch.Tensor, device: torch.device, channels_last: bool = False):
        return cls(model_input(images, device, channels_last), labels.to(device))

    def __len__(self) -> int:
        return self.labels.shape[0]


def steps_per_epoch(num_samples: int, global_batch: int) -> int:
    """Full global batches per epoch (the remainder is dropped, different images each epoch)."""
    return num_samples // global_batch


def epoch_indices(num_samples: int, rank: int, world_size: int, seed: int, epoch: int) -> torch.Tensor:
    """This rank's share of epoch `epoch`'s permutation, in the order it is consumed.

    drop_last=True: the shares are disjoint (no padding duplicates); the at most
    world_size - 1 images left over lie past the last full global batch anyway.
    """
    sampler = DistributedSampler(
        range(num_samples), num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=True
    )
    sampler.set_epoch(epoch)
    return torch.tensor(list(sampler), dtype=torch.long)


def to_device(indices: torch.Tensor, device: torch.device) -> torch.Tensor:
    """An epoch's indices onto the device without making the host wait for the GPU.

    A copy from pageable memory blocks the host until the GPU has drained its queue up to
    the copy; from pinned memory with non_blocking=True it is queued like a kernel (torch's
    caching host allocator keeps the pinned buffer alive until the copy has run).
    """
    if device.type != "cuda":
        return indices.to(device)
    return indices.pin_memory().to(device, non_blocking=True)


def batch_indices(share: torch.Tensor, step_in_epoch: int, per_rank_batch: int) -> torch.Tensor:
    """The rank's indices for one step: a slice of its share of the epoch."""
    start = step_in_epoch * per_rank_batch
    return share[start : start + per_rank_batch]


def step_seed(seed: int, step: int, rank: int) -> int:
    """The RNG seed of one rank's step (dropout masks): a pure function of (seed, step, rank),
    so a resumed run draws the same masks without saving RNG state."""
    return (seed * 1_000_003 + step) * 1_009 + rank


def seed_step(seed: int, device: torch.device) -> None:
    """Seeds what a step draws from (dropout masks): the CPU's default generator and, on CUDA,
    the training device's -- what torch.manual_seed does to these two, bit for bit.

    Not torch.manual_seed itself, every step: it also seeds every other device type, and for each
    one not initialized (XPU and MTIA on a CUDA node; CUDA as well on a CPU one) it queues the
    seeding with the caller's traceback.format_stack() (torch/random.py `_manual_seed_impl`,
    `_lazy_call` in torch/{cuda,xpu,mtia}/__init__.py; torch 2.14.1): 0.2-0.3 ms of host time a
    call on a 2-core AMD EPYC, ~1 us this way (docs/performance.md)."""
    torch.default_generator.manual_seed(seed)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        torch.cuda.default_generators[index].manual_seed(seed)


def eval_shard(num_samples: int, rank: int, world_size: int) -> tuple[int, int]:
    """[start, stop) of the test set evaluated by this rank: contiguous, no padding.

    The shards cover every test image exactly once, for any world size.
    """
    return num_samples * rank // world_size, num_samples * (rank + 1) // world_size
