"""Muon's share of a training step, by Newton-Schulz iteration count and form, measured side by side.

    python bench/muon_share.py                       # fp32, per-rank batch 64, 1 thread (a rank of 2 on 2 cores)
    python bench/muon_share.py --precision bf16 --ns 5 3 2 --forms gram --rounds 7

One process: the default recipe's model (channels_last), Adam + Muon and loss, on one rank's share
of the default global batch (128 over 2 ranks). Every round runs a block of steps for each
(iteration count, form) in turn (A B C A B C ...), so the machine's drift hits all alike; a step is timed
from the batch slice to the end of the optimizer step (CPU: synchronous), Muon's part around its
step(). glibc's malloc thresholds are fixed as the trainer fixes them (train.keep_heap). Prints the
median step time and Muon's share per count.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cnn import config, perf, precision  # noqa: E402
from cnn.model import CNN  # noqa: E402
from cnn import optim  # noqa: E402
from cnn.optim import build_optimizer  # noqa: E402

FORMS = {"gram": optim.newton_schulz, "direct": optim.newton_schulz_direct}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--ns", nargs="+", type=int, default=[5, 3, 2], help="Newton-Schulz iteration counts")
    p.add_argument("--forms", nargs="+", default=["gram", "direct"], choices=sorted(FORMS))
    p.add_argument("--batch", type=int, default=64, help="per-rank batch")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--block", type=int, default=20, help="timed steps per count per round")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    cfg = config.parse_args(["--config", "configs/default.yaml"])
    # as the trainer (train.keep_heap): without it this process re-faults its activations' pages every
    # step, which made a bf16 step ~1.5x as long here and Muon's share look two thirds of what it is
    print(perf.keep_heap(cfg.train.keep_heap))
    autocast = precision.autocast_for(a.precision, torch.device("cpu"))
    torch.manual_seed(0)
    x = torch.randn(a.batch, 1, 28, 28).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (a.batch,))
    runs = {}
    for ns in a.ns:
        for form in a.forms:
            torch.manual_seed(0)
            model = CNN(cfg.model.dropout).to(memory_format=torch.channels_last)
            opt = build_optimizer(model, cfg.optim)
            for g in opt.muon.param_groups:
                g["ns_steps"] = ns
            runs[ns, form] = (model, opt, [], [])

    def step(model, opt, form) -> tuple[float, float]:
        t0 = time.perf_counter()
        with autocast():
            loss = F.cross_entropy(model(x), y, label_smoothing=cfg.optim.label_smoothing)
        loss.backward()
        opt.adam.step()
        optim.newton_schulz = FORMS[form]  # what Muon.step calls
        t1 = time.perf_counter()
        opt.muon.step()
        t2 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0, t2 - t1

    for (_, form), (model, opt, _, _) in runs.items():  # warm-up
        for _ in range(5):
            step(model, opt, form)
    for _ in range(a.rounds):
        for (_, form), (model, opt, totals, muons) in runs.items():
            for _ in range(a.block):
                total, muon = step(model, opt, form)
                totals.append(total)
                muons.append(muon)
    print(f"{a.precision}, batch {a.batch}, {a.threads} thread(s), {a.rounds} rounds x {a.block} steps")
    print(f"{'NS iterations':>13} {'form':>6} {'step ms':>8} {'Muon ms':>8} {'Muon share':>10}")
    for (ns, form), (_, _, totals, muons) in runs.items():
        total, muon = statistics.median(totals), statistics.median(muons)
        print(f"{ns:>13} {form:>6} {total * 1e3:>8.2f} {muon * 1e3:>8.2f} {muon / total:>10.1%}")


if __name__ == "__main__":
    main()
