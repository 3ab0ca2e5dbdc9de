"""The trainer against a bare DDP loop of the same recipe, interleaved: what does the loop's own
bookkeeping cost?

    python bench/bare_loop.py                                # fp32 and bf16, 1 and 2 ranks, 3 rounds
    python bench/bare_loop.py --precisions fp32 --nprocs 2 --rounds 5 --steps 300
    python bench/bare_loop.py --nprocs 1 --steps 600 -- train.batch_size=8 optim.muon_lr=0   # host-bound

The bare loop is the same model, optimizer (Adam + Muon), schedule, label smoothing, dropout,
data resident on the device, memory format, batch sharding, precision, DDP flags, threads per rank, malloc
thresholds (train.keep_heap) and, on CUDA, cudnn.benchmark as
`train_ddp.py --config configs/default.yaml`, and nothing else: no metrics window, stop checks,
rank statistics, watchdog, sample hashes, progress line, evaluation or checkpoints. Both sides
run `--steps` steps and report images/s after the first `train.log_every` steps (the trainer's
`steady_images_per_sec`: its log points' own work -- evaluation, W&B, checkpoints -- is outside
its training clock, as it has no counterpart here; W&B's cost: bench/wandb_overhead.py). Every
round runs each pair back to back, trainer first in odd rounds and bare first in even ones (A B B A),
so a shared machine's drift and any order effect hit both alike;
the table gives medians and the median of the per-round ratios. Overrides after `--` go to both
sides: a tiny batch with Adam alone makes a CPU step short enough that the loop's host work per
step shows, as it does on a GPU, where the host is the bottleneck.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def bare(argv: list[str]) -> None:
    """One rank of the bare loop (launched like the trainer); rank 0 prints {"images_per_sec": ...}."""
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.nn.parallel import DistributedDataParallel as DDP

    from cnn import config, distributed, perf, precision
    from cnn.model import CNN
    from cnn.optim import build_optimizer, set_lr
    from data import mnist
    from data.sharding import DeviceDataset, batch_indices, epoch_indices, steps_per_epoch, to_device

    cfg = config.parse_args(argv)
    d = distributed.setup(cfg.device, cfg.dist.init_timeout_s)
    distributed.set_cpu_threads(cfg.train.threads, d)
    perf.keep_heap(cfg.train.keep_heap)  # as the trainer: otherwise glibc's history decides the page faults
    if d.device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as the trainer
    train_set = DeviceDataset.from_uint8(*mnist.load(cfg.data.root, True, cfg.data.train_subset), d.device,
                                         cfg.train.channels_last)
    per_rank = cfg.train.batch_size // d.world_size
    spe = steps_per_epoch(len(train_set), cfg.train.batch_size)
    total = min(int(cfg.train.epochs * spe), cfg.train.max_steps or int(cfg.train.epochs * spe))
    torch.manual_seed(cfg.seed)
    raw = CNN(cfg.model.dropout).to(d.device)
    if cfg.train.channels_last:
        raw = raw.to(memory_format=torch.channels_last)
    opt = build_optimizer(raw, cfg.optim, cfg.train.muon_cuda_graph)
    autocast = precision.autocast_for(cfg.precision, d.device) if cfg.precision != "fp32" else None
    ddp = DDP(raw, device_ids=[d.device.index] if d.device.type == "cuda" else None, gradient_as_bucket_view=True)
    warm = cfg.train.log_every
    share, t0 = None, None
    for step in range(total):
        if step == warm:
            if d.device.type == "cuda":
                torch.cuda.synchronize(d.device)  # the warm-up's queued kernels are not the clock's
            dist.barrier()
            t0 = time.perf_counter()
        epoch, s = divmod(step, spe)
        if s == 0 or share is None:
            share = to_device(epoch_indices(len(train_set), d.rank, d.world_size, cfg.seed, epoch), d.device)
        idx = batch_indices(share, s, per_rank)
        x, y = train_set.images[idx], train_set.labels[idx]
        set_lr(opt, step, total, cfg.optim)
        if autocast is None:
            loss = F.cross_entropy(ddp(x), y, label_smoothing=cfg.optim.label_smoothing)
        else:
            with autocast():
                loss = F.cross_entropy(ddp(x), y, label_smoothing=cfg.optim.label_smoothing)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    if d.device.type == "cuda":
        torch.cuda.synchronize(d.device)
    dist.barrier()
    seconds = time.perf_counter() - t0
    if d.rank == 0:
        print(json.dumps({"images_per_sec": (total - warm) * cfg.train.batch_size / seconds}), flush=True)
    distributed.cleanup()


def launch(nproc: int, entry: list[str]) -> list[str]:
    if nproc == 1:
        return [sys.executable, *entry]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *entry]


def run_pair(nproc: int, prec: str, steps: int, root: str, tmp: Path, bare_first: bool,
             overrides: list[str]) -> tuple[float, float]:
    common = ["--config", "configs/default.yaml", f"data.root={root}", f"precision={prec}", f"train.max_steps={steps}",
              "wandb.mode=disabled", "train.roofline=false", *overrides]
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(PYTHONUNBUFFERED="1", OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // nproc)))
    run_dir = tmp / f"run-{time.monotonic_ns()}"

    def trainer() -> float:
        proc = subprocess.run(launch(nproc, ["train_ddp.py", *common, f"run.dir={run_dir}"]), cwd=REPO, env=env,
                              capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"trainer failed:\n{proc.stderr[-2000:]}")
        return json.loads((run_dir / "summary.json").read_text())["steady_images_per_sec"]

    def loop() -> float:
        proc = subprocess.run(launch(nproc, [str(Path(__file__).resolve()), "--bare", *common]), cwd=REPO, env=env,
                              capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"bare loop failed:\n{proc.stderr[-2000:]}")
        return json.loads(proc.stdout.strip().splitlines()[-1])["images_per_sec"]

    if bare_first:
        theirs = loop()
        ours = trainer()
    else:
        ours = trainer()
        theirs = loop()
    return ours, theirs


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--bare":
        return bare(sys.argv[2:])
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    p.add_argument("--nprocs", nargs="+", type=int, default=[1, 2])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=200, help="steps per run (the default recipe's first 200)")
    p.add_argument("--root", default="datasets", help="data.root")
    p.add_argument("overrides", nargs="*", help="config overrides for both sides (key=value), after --")
    a = p.parse_args()
    results: dict[tuple[int, str], list[tuple[float, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(a.rounds):
            for nproc in a.nprocs:
                for prec in a.precisions:
                    pair = run_pair(nproc, prec, a.steps, a.root, Path(tmp), r % 2 == 1, a.overrides)
                    results.setdefault((nproc, prec), []).append(pair)
                    print(f"round {r + 1}: {nproc} rank(s) {prec}: trainer {pair[0]:.0f} img/s, bare {pair[1]:.0f} "
                          f"img/s, ratio {pair[0] / pair[1]:.3f}", flush=True)
    print(f"\n{'ranks':>5} {'precision':>9} {'trainer img/s':>13} {'bare img/s':>10} {'trainer/bare':>12} "
          f"(median of {a.rounds} rounds, {a.steps} steps each{'; ' + ' '.join(a.overrides) if a.overrides else ''})")
    for (nproc, prec), pairs in results.items():
        ratio = statistics.median(o / t for o, t in pairs)
        print(f"{nproc:>5} {prec:>9} {statistics.median(o for o, _ in pairs):>13.0f} "
              f"{statistics.median(t for _, t in pairs):>10.0f} {ratio:>12.3f}")


if __name__ == "__main__":
    main()
