"""The rare abort at exit ("terminate called without an active exception", exit -6): its cause
shown on a minimal gloo job, and the trainer's exit path run many times.

    python bench/exit_stress.py                 # 100 trainer runs (2 ranks, torchrun) + the mechanism
    python bench/exit_stress.py --runs 20 --mechanism-runs 10

The cause (gdb backtrace, torch 2.14.1, CPython 3.11): a gloo process group still alive when the
interpreter finalizes. Its worker thread "pt_gloo_runloop" (ProcessGroupGloo::runLoop) drops the last
reference to a finished work object (~AsyncAllgatherWork); freeing the work's output tensors
decrefs their Python objects (TensorImpl::decref_pyobject -> pybind11::gil_scoped_acquire), and
taking the GIL while the main thread is in Py_FinalizeEx makes CPython end that thread with
pthread_exit (take_gil -> PyThread_exit_thread); the forced unwind runs into the noexcept
destructor and std::terminate aborts the process. The trainer removes both conditions:
cnn.distributed.cleanup() destroys every group (joining its threads) while the interpreter is
alive, and exit_process() ends with os._exit after the atexit handlers, so no finalization runs.

Part 1 ("mechanism") runs a 5-rank gloo all_gather that exits normally without destroying the
group, and the same job ending through cleanup() + exit_process(); part 2 runs the trainer.
Prints the exits of each and returns 1 if any trainer run or any "ours" run did not exit 0.
"""

from __future__ import annotations

import argparse
import collections
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

MINIMAL = f"""
import sys, torch, torch.distributed as dist
sys.path.insert(0, {str(REPO)!r})
dist.init_process_group("gloo")
out = [torch.empty(1) for _ in range(dist.get_world_size())]
dist.all_gather(out, torch.tensor([float(dist.get_rank())]))
if sys.argv[1] == "ours":
    from cnn import distributed
    distributed.cleanup()
    distributed.exit_process(0)
"""


def torchrun(nproc: int, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]


def env() -> dict[str, str]:
    e = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "RANK", "WORLD_SIZE", "MASTER_"))}
    e.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return e


def launch(cmd: list[str], timeout: float) -> tuple[int, bool]:
    """(torchrun's exit code, whether a worker aborted in std::terminate)."""
    try:
        p = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return 124, False
    return p.returncode, "terminate called" in p.stderr or "Signal 6 (SIGABRT)" in p.stderr


def mechanism(runs: int) -> dict[str, collections.Counter]:
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(MINIMAL)
    try:
        return {mode: collections.Counter(launch(torchrun(5, f.name, mode), 120) for _ in range(runs))
                for mode in ("plain", "ours")}
    finally:
        os.unlink(f.name)


def trainer(runs: int, root: str) -> collections.Counter:
    counts: collections.Counter = collections.Counter()
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(runs):
            args = (f"data.root={root}", f"run.dir={tmp}/run{i}", "wandb.mode=disabled", "train.roofline=false",
                    "data.train_subset=1280", "data.test_subset=200", "train.max_steps=4", "train.log_every=2")
            counts[launch(torchrun(2, str(REPO / "train_ddp.py"), *args), 300)] += 1
            if (i + 1) % 10 == 0:
                print(f"  trainer runs {i + 1}/{runs}: {dict(counts)}", flush=True)
    return counts


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=100, help="trainer runs (2 ranks each)")
    ap.add_argument("--mechanism-runs", type=int, default=10, help="runs of each minimal job")
    ap.add_argument("--root", default="datasets", help="the MNIST folder (data.root; fetched or converted if absent)")
    a = ap.parse_args()
    t0 = time.monotonic()
    mech = mechanism(a.mechanism_runs)
    for mode, counts in mech.items():
        print(f"minimal gloo job, 5 ranks, exit {'without destroying the group' if mode == 'plain' else 'as the trainer'}"
              f": {a.mechanism_runs} runs, (exit code, aborted) -> count: {dict(counts)}", flush=True)
    runs = trainer(a.runs, a.root)
    print(f"trainer, 2 ranks under torchrun: {a.runs} runs, (exit code, aborted) -> count: {dict(runs)}; "
          f"{time.monotonic() - t0:.0f} s in all")
    ok = runs == collections.Counter({(0, False): a.runs}) and mech["ours"] == collections.Counter({(0, False): a.mechanism_runs})
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
