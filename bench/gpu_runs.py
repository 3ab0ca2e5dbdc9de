"""The trainer on CUDA, as bench/gpu_check.sh runs it: fp32, bf16 and fp16, eager and with
torch.compile's reduce-overhead mode (CUDA graphs), as one process and under torchrun on all GPUs.

    python bench/gpu_runs.py --data DATA_ROOT --work SCRATCH --out OUT --deadline-s 240
    python bench/gpu_runs.py --plan --gpus 8          # print the runs, start nothing

Each run is bounded (a step budget of 3 epochs at global batch 512, a per-run timeout, and the
overall deadline: runs that no longer fit are reported as skipped).  Run folders, with their
checkpoints, go to --work; --out receives table.txt, results.jsonl and failures.log only.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cnn.perf import Roofline, throughput  # noqa: E402
from cnn.rundir import read_metrics, read_summary  # noqa: E402

GLOBAL_BATCH = 512  # keeps a GPU busier than the default 128; lr 4e-3 reaches 99% with it in 3 epochs
TRAIN_ARGS = ["optim.lr=4e-3", "train.epochs=3", "train.eval_every=20", "train.log_every=20", "wandb.mode=disabled",
              "checkpoint.keep=1"]
EAGER_TIMEOUT_S, COMPILED_TIMEOUT_S = 90, 150  # per run: start-up + ~350 steps (+ a cold compile)
MIN_RUN_S = 25  # a run with less time left than this is skipped, not started


@dataclass(frozen=True)
class Run:
    precision: str  # fp32 | bf16 | fp16
    compiled: bool  # torch.compile(mode="reduce-overhead"): CUDA graphs
    nproc: int = 1  # torchrun's --nproc_per_node; 0 = a plain python process

    @property
    def name(self) -> str:
        launch = f"torchrun{self.nproc}" if self.nproc else "python"
        return f"{self.precision}-{'graphs' if self.compiled else 'eager'}-{launch}"


def plan(gpus: int) -> list[Run]:
    """The runs, most informative first (a tight deadline cuts the last): eager as one process and
    under torchrun on all GPUs; then compiled bf16 both ways; then compiled fp32 and fp16."""
    launches = (0, gpus)
    runs = [Run(p, False, n) for n in launches for p in ("fp32", "bf16", "fp16")]
    runs += [Run("bf16", True, n) for n in launches]
    runs += [Run(p, True, n) for p in ("fp32", "fp16") for n in launches]
    return runs


def command(run: Run, data_root: str, run_dir: Path, python: str = sys.executable) -> list[str]:
    world = max(1, run.nproc)
    batch = GLOBAL_BATCH // world * world  # divisible by the world size
    args = [f"data.root={data_root}", f"run.dir={run_dir}", f"precision={run.precision}",
            f"train.batch_size={batch}", *TRAIN_ARGS]
    if run.compiled:
        args += ["train.compile=true", "train.compile_mode=reduce-overhead"]
    launch = [python, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={run.nproc}"] \
        if run.nproc else [python]
    return [*launch, str(REPO / "train_ddp.py"), *args]


def process_tree(pid: int) -> list[int]:
    """pid and all its descendants (Linux /proc).  torchrun starts its workers in sessions of their
    own (torch/distributed/elastic/multiprocessing/subprocess_handler: start_new_session=True), so
    killing the agent's process group would leave them running on the GPU."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(stat.parent.name))
    tree, todo = [], [pid]
    while todo:
        tree.append(todo.pop())
        todo += children.get(tree[-1], [])
    return tree


def launch(cmd: list[str], timeout_s: float) -> tuple[int | str, str]:
    """(exit code or "timeout", output) of cmd; on timeout it is killed with all its descendants."""
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out = proc.communicate(timeout=timeout_s)[0]
        return proc.returncode, out
    except subprocess.TimeoutExpired:
        for pid in reversed(process_tree(proc.pid)):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return "timeout", proc.communicate()[0]


def result(run: Run, summary: dict, window_ips: list[float], wall_s: float) -> dict:
    """One row: the summary's figures, and the steady rate (median of the training windows after the
    first, which holds the warm-up and any compilation) with its MFU against both peaks."""
    steady = statistics.median(window_ips[1:]) if len(window_ips) > 1 else summary["images_per_sec"]
    roof = Roofline(summary["peak_gflops"], summary.get("peak_datasheet_gflops"), summary.get("peak_basis", "?"))
    tp = throughput(int(steady), 1.0, roof)
    return {"run": run.name, "status": "ok", "precision": run.precision, "compiled": run.compiled,
            "nproc": run.nproc, "images_per_sec": summary["images_per_sec"], "steady_images_per_sec": steady,
            "seconds_to_99": summary["seconds_to_99"], "test_accuracy": summary["test_accuracy"],
            "mfu": tp["mfu"], "mfu_datasheet": tp["mfu_datasheet"], "peak_basis": roof.basis,
            "peak_gpu_mb": summary.get("peak_gpu_mb"), "cudagraph_replays": summary.get("cudagraph_replays"),
            "cudagraph_skips": summary.get("cudagraph_skips"), "tf32_matmul": summary.get("tf32_matmul"),
            "tf32_cudnn": summary.get("tf32_cudnn"), "device_name": summary.get("device_name"),
            "wall_s": wall_s}


HEADER = (f"{'run':<24} {'img/s':>8} {'steady':>8} {'s to 99%':>8} {'acc':>7} {'MFU':>6} {'MFU ds':>6} "
          f"{'basis':>5} {'GPU MiB':>8}  CUDA graphs")


def table_line(row: dict) -> str:
    if row["status"] != "ok":
        return f"{row['run']:<24} {row['status']}"

    def pct(x):
        return "-" if x is None else f"{100 * x:.1f}%"

    t99 = "-" if row["seconds_to_99"] is None else f"{row['seconds_to_99']:.1f}"
    mem = "-" if row["peak_gpu_mb"] is None else f"{row['peak_gpu_mb']:.0f}"
    graphs = "-" if not row["compiled"] else (
        f"{'replayed' if row['cudagraph_replays'] else 'NOT replayed'} ({row['cudagraph_replays']} replays, "
        f"{row['cudagraph_skips']} skips)")
    return (f"{row['run']:<24} {row['images_per_sec']:>8.0f} {row['steady_images_per_sec']:>8.0f} {t99:>8} "
            f"{row['test_accuracy']:>7.4f} {pct(row['mfu']):>6} {pct(row['mfu_datasheet']):>6} "
            f"{row['peak_basis']:>5} {mem:>8}  {graphs}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="datasets", help="data.root holding MNIST")
    parser.add_argument("--work", type=Path, help="scratch folder for the run folders (checkpoints)")
    parser.add_argument("--out", type=Path, help="where table.txt, results.jsonl and failures.log go")
    parser.add_argument("--gpus", type=int, help="torchrun's --nproc_per_node (default: all visible GPUs)")
    parser.add_argument("--deadline-s", type=float, default=240.0, help="seconds for all runs together")
    parser.add_argument("--plan", action="store_true", help="print the commands and stop")
    args = parser.parse_args(argv)
    if args.gpus is None:
        import torch

        args.gpus = max(1, torch.cuda.device_count())
    runs = plan(args.gpus)
    if args.plan:
        for run in runs:
            print(f"{run.name:<24} {' '.join(command(run, args.data, Path('RUN_DIR'), 'python3'))}")
        return 0
    if args.work is None or args.out is None:
        parser.error("--work and --out are needed to run")
    deadline = time.monotonic() + args.deadline_s
    args.out.mkdir(parents=True, exist_ok=True)
    table, results, failures = args.out / "table.txt", args.out / "results.jsonl", args.out / "failures.log"
    for path in (table, results, failures):
        path.write_text("")
    print(HEADER)
    with open(table, "a") as tf:
        tf.write(HEADER + "\n")
    failed = 0
    for run in runs:
        left = deadline - time.monotonic()
        limit = min(COMPILED_TIMEOUT_S if run.compiled else EAGER_TIMEOUT_S, left)
        run_dir = args.work / run.name
        row = {"run": run.name, "status": f"skipped ({left:.0f} s left of the time budget)"}
        if limit >= MIN_RUN_S:
            t0 = time.monotonic()
            code, log = launch(command(run, args.data, run_dir), limit)
            wall = time.monotonic() - t0
            if code == 0:
                ips = [r["images_per_sec"] for r in read_metrics(run_dir, "train")]
                row = result(run, read_summary(run_dir), ips, wall)
            else:
                failed += 1
                why = f"timed out after {limit:.0f} s" if code == "timeout" else f"exit {code}"
                row = {"run": run.name, "status": f"FAILED ({why})"}
                with open(failures, "a") as ff:
                    ff.write(f"==== {run.name}: {row['status']}\n" + "\n".join(log.splitlines()[-40:]) + "\n")
        line = table_line(row)
        print(line, flush=True)
        with open(table, "a") as tf:
            tf.write(line + "\n")
        with open(results, "a") as rf:
            rf.write(json.dumps(row) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
