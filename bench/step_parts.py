"""Where a training step's host time goes: ms per step of the bare loop and of its parts, one process,
interleaved rounds (A B C ... then ... C B A), medians; then a profiler table of the whole step.

    python bench/step_parts.py                          # CUDA where present, else CPU
    python bench/step_parts.py --device cpu --steps 50 --rounds 3 --only "bare,opt.step"

The step is the default recipe's (batch 128, Adam + Muon, one-cycle schedule, label smoothing 0.1,
bf16 autocast unless a row says fp32) on random data already on the device, DDP with one rank
(gradient_as_bucket_view: train_ddp's flags). Rows drop one part at a time -- DDP,
Muon, the optimizer, the backward -- or replace it: Muon's update as a CUDA graph
(train.muon_cuda_graph), `torch.compile` of the optimizer step (constant learning rate, so that it
does not recompile each step), the model compiled with mode=reduce-overhead -- or add one: the
trainer's per-step reseeding (dropout masks), by torch.manual_seed as it was until 2026-12-04 or by
data.sharding.seed_step as it is now. On a GPU the step is
host-bound when the wall clock per step is far above the profiler's CUDA time per step (printed last).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

BATCH = 128
WARMUP_STEPS = 30

# name -> options: ddp, muon, prec, part (full | fwdbwd | opt), lr (schedule each step), graph
# (Muon as a CUDA graph), compile_opt, compile_model (a torch.compile mode), seed (torch | step: reseed
# each step by torch.manual_seed or seed_step); cuda: CUDA only
ROWS = {
    "bare bf16 (DDP, Adam + Muon, schedule)": {},
    "bare bf16, Muon as a CUDA graph": {"graph": True, "cuda": True},
    "bare fp32": {"prec": "fp32"},
    "bare bf16 + torch.manual_seed each step": {"seed": "torch"},
    "bare bf16 + seed_step each step (the trainer's)": {"seed": "step"},
    "no DDP": {"ddp": False},
    "Adam only": {"muon": False},
    "forward + backward only (DDP)": {"part": "fwdbwd"},
    "forward + backward only (no DDP)": {"part": "fwdbwd", "ddp": False},
    "opt.step only (Adam + Muon)": {"part": "opt"},
    "opt.step only (Adam + Muon as a CUDA graph)": {"part": "opt", "graph": True, "cuda": True},
    "opt.step only (Adam)": {"part": "opt", "muon": False},
    "opt.step only, torch.compile'd (constant lr)": {"part": "opt", "compile_opt": True, "lr": False},
    "no DDP, model compiled reduce-overhead": {"ddp": False, "compile_model": "reduce-overhead", "cuda": True},
}


def build(device, cfg, ddp=True, muon=True, prec="bf16", part="full", lr=True, graph=False, compile_opt=False,
          compile_model=None, seed=None):
    """One row's step function: step(i) runs optimizer step i of a 10,000-step schedule."""
    import torch
    import torch.nn.functional as F
    from torch.nn.parallel import DistributedDataParallel as DDP

    from cnn.model import CNN
    from cnn.optim import build_optimizer, set_lr
    from data.sharding import seed_step

    torch.manual_seed(0)
    raw = CNN(0.0).to(device).to(memory_format=torch.channels_last)
    ocfg = cfg if muon else dataclasses.replace(cfg, muon_lr=0.0)
    opt = build_optimizer(raw, ocfg, cuda_graph=graph)
    model = DDP(raw, device_ids=[device.index] if device.type == "cuda" else None,
                gradient_as_bucket_view=True) if ddp else raw
    if compile_model:
        model = torch.compile(model, mode=compile_model)
    opt_step = torch.compile(opt.step) if compile_opt else opt.step
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=prec == "bf16")
    g = torch.Generator(device=device).manual_seed(0)
    images = torch.randn(6000, 1, 28, 28, device=device, generator=g).to(memory_format=torch.channels_last)
    labels = torch.randint(0, 10, (6000,), device=device, generator=g)
    order = torch.randperm(6000, device=device, generator=g)

    def forward_backward(i: int) -> None:
        idx = order[(i * BATCH) % (6000 - BATCH):][:BATCH]
        with autocast:
            loss = F.cross_entropy(model(images[idx]), labels[idx], label_smoothing=0.1)
        loss.backward()

    def step(i: int) -> None:
        if lr:
            set_lr(opt, i, 10_000, ocfg)
        if seed == "torch":
            torch.manual_seed(i)
        elif seed == "step":
            seed_step(i, device)
        if part != "opt":
            forward_backward(i)
        if part != "fwdbwd":
            opt_step()
        if part != "opt":
            opt.zero_grad(set_to_none=True)

    forward_backward(0)  # grads for the opt.step-only rows (kept: they never zero them)
    for i in range(WARMUP_STEPS):
        step(i)
    return step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", help="cuda or cpu (default: cuda where present)")
    p.add_argument("--steps", type=int, default=200, help="timed steps per row and round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--only", default="", help="comma-separated substrings of the rows to run")
    a = p.parse_args()

    import torch
    import torch.distributed as dist
    from torch.profiler import ProfilerActivity, profile

    from cnn import config, perf

    perf.keep_heap(True)  # as the trainer (train.keep_heap): else glibc's history decides a CPU step's page faults
    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", 0)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as the trainer
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29561")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1,
                            **({"device_id": device} if device.type == "cuda" else {}))
    cfg = config.build(REPO / "configs" / "default.yaml").optim  # the default recipe's optimizer settings

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    rows = {}
    for name, opts in ROWS.items():
        if a.only and not any(s.strip() in name for s in a.only.split(",")):
            continue
        if opts.get("cuda") and device.type != "cuda":
            print(f"left out (CUDA only): {name}")
            continue
        t = time.perf_counter()
        rows[name] = build(device, cfg, **{k: v for k, v in opts.items() if k != "cuda"})
        print(f"built {name} in {time.perf_counter() - t:.1f} s", flush=True)
    ms = {name: [] for name in rows}
    for r in range(a.rounds):
        for name in (list(rows) if r % 2 == 0 else list(rows)[::-1]):
            sync()
            t = time.perf_counter()
            for i in range(a.steps):
                rows[name](WARMUP_STEPS + r * a.steps + i)
            sync()
            ms[name].append((time.perf_counter() - t) / a.steps * 1e3)

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"\n{where}, torch {torch.__version__}, batch {BATCH}, {a.steps} steps x {a.rounds} rounds "
          f"(median ms per step, then each round)")
    for name, values in ms.items():
        print(f"{statistics.median(values):8.3f}  {name}   ({', '.join(f'{v:.2f}' for v in values)})")

    if rows:
        first = next(iter(rows))
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=activities) as prof:
            for i in range(20):
                rows[first](10_000 - 20 + i)
            sync()
        events = prof.key_averages()
        print(f"\nprofiler, 20 steps of '{first}': host (self CPU) {sum(e.self_cpu_time_total for e in events) / 20e3:.2f} "
              f"ms per step" + (f", GPU (self CUDA) {sum(e.self_device_time_total for e in events) / 20e3:.2f} ms per step"
                                if device.type == "cuda" else ""))
        print(events.table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=45))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
