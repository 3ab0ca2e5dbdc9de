"""What the trainer's own per-step work costs the host, call by call: the part of train_ddp.py's loop
that a bare DDP loop does not have (bench/bare_loop.py times the two loops whole).

    python bench/loop_cost.py                 # CUDA where present, else CPU
    python bench/loop_cost.py --device cpu --calls 5000

One process (world size 1; on CUDA NCCL and the gloo side group, as the trainer), the trainer's own
objects on the device the run would use: the dropout reseeding (seed_step), the watchdog's beat, the
sync check, the fault rehearsal's test, the metrics window's accumulation (6 dispatched ops, 5 kernel
launches on a GPU), the straggler figures' per-step part (the last gradient's hook body, called
directly rather than by autograd, and after_backward: host clock reads on a CPU, two CUDA events on a
GPU), the grad scaler of a bf16/fp32 run (disabled), and the stop check, an all-reduce on the gloo
group every STOP_CHECK_EVERY steps. Each is called
--calls times back to back; the table gives microseconds of host time per call and per step, and the
sum. Host time only: on a GPU what is launched runs later, and the step's wall clock is the host's
where the step is host-bound.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "docs"))


def per_call_us(fn: Callable[[], object], calls: int, sync: Callable[[], None]) -> float:
    for _ in range(min(50, calls)):
        fn()
    sync()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    seconds = time.perf_counter() - t0  # host time: what was launched is not waited for
    sync()
    return seconds / calls * 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="auto", help="auto (CUDA where present) | cpu | cuda")
    p.add_argument("--calls", type=int, default=2000, help="calls of each item (the stop check: a tenth)")
    a = p.parse_args()

    import torch

    from cnn import config, distributed, fault, perf
    from cnn.distributed import StopRequest
    from cnn.model import CNN
    from data.sharding import batch_indices, seed_step, step_seed
    from make_transcripts import cpu_line  # lscpu's model and the flags that decide bf16
    from train_ddp import STOP_CHECK_EVERY

    perf.keep_heap(True)  # as the trainer
    d = distributed.setup(a.device)
    watchdog = None
    try:
        cfg = config.build(REPO / "configs" / "default.yaml")
        device, per_rank = d.device, cfg.train.batch_size // 2  # one rank's batch of the default 2-rank run
        sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
        model = CNN(cfg.model.dropout).to(device)
        last = list(model.parameters())[0]
        logits = torch.randn(per_rank, 10, device=device)
        labels = torch.randint(0, 10, (per_rank,), device=device)
        loss = logits.logsumexp(1).mean()
        images, targets = torch.randn(6000, 1, 28, 28, device=device), torch.randint(0, 10, (6000,), device=device)
        share = torch.randperm(6000, device=device)
        window = perf.Window(device)
        watchdog = distributed.make_watchdog(True, 600.0, d.rank)
        syncs = perf.SyncCheck(False, device)
        ranks = perf.make_rank_stats(True, model, device, d.world_size, lambda m: None)
        scaler = torch.amp.GradScaler(device.type, enabled=False)  # bf16 and fp32 runs: disabled
        stop = StopRequest(announce=False)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a timeout's SIGTERM (gpu_check.sh --gap) ends this bench
        signal.signal(signal.SIGINT, signal.default_int_handler)

        def rank_stats() -> None:
            ranks._on_grad(last)  # the post-accumulate-grad hook's body, as autograd calls it for the last grad
            ranks.after_backward()
            ranks._pairs.clear()  # CUDA: the window's event pairs, dropped here instead of at its close

        def batch() -> object:
            idx = batch_indices(share, 5, per_rank)
            return images[idx], targets[idx]

        items: list[tuple[str, Callable[[], object], int]] = [
            ("seed_step (dropout reseeding)", lambda: seed_step(step_seed(cfg.seed, 5, d.rank), device), 1),
            ("watchdog.beat", lambda: watchdog.beat(5), 1),
            ("syncs.forbid (train.sync_debug off)", syncs.forbid, 1),
            ("fault.maybe_fault", lambda: fault.maybe_fault(cfg.checkpoint, d.rank, 5), 1),
            ("window.add (the metrics window)", lambda: window.add(loss, logits, labels), 1),
            ("rank stats: hook + after_backward", rank_stats, 1),
            ("scaler.scale + scaler.update (disabled)", lambda: (scaler.scale(loss), scaler.update()), 1),
            (f"stop.agreed (every {STOP_CHECK_EVERY} steps)", lambda: stop.agreed(d.cpu_group), STOP_CHECK_EVERY),
            ("batch slicing (the bare loop has it too)", batch, 0),
        ]
        where = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_line()
        print(f"{device.type} ({where}), torch {torch.__version__}, {a.calls} calls each, host time")
        print(f"{'item':<44} {'us/call':>8} {'us/step':>8}")
        total = 0.0
        for name, fn, every in items:
            calls = max(1, a.calls // every) if every else a.calls
            us = per_call_us(fn, calls, sync)
            step_us = us / every if every else 0.0
            total += step_us
            print(f"{name:<44} {us:>8.2f} {step_us:>8.2f}" + ("" if every else "  (not counted)"))
        print(f"{'in all, per step':<44} {'':>8} {total:>8.1f}")
    finally:
        if watchdog is not None:
            watchdog.stop()
        distributed.cleanup()


if __name__ == "__main__":
    main()
