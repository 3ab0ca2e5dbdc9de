"""The trainer on CUDA, as bench/gpu_check.sh runs it: fp32, bf16 and fp16, eager and with
torch.compile's reduce-overhead mode (CUDA graphs), as one process and under torchrun on all GPUs.

    python bench/gpu_runs.py --data DATA_ROOT --work SCRATCH --out OUT --deadline-s 165
    python bench/gpu_runs.py --plan --gpus 8 --deadline-s 165 --commands   # the plan, start nothing
    python bench/gpu_runs.py --preflight                         # what the check needs, one line each
    python bench/gpu_runs.py --pytest-args                       # the check's pytest options, one a line

The plan is sized to the time it is given (`plan`): rows are taken, most informative first, while
their estimated time fits PLAN_SHARE of it, and what is left out is printed with why. Each run is
bounded (a step budget, a per-run timeout and the overall deadline); a run that the deadline cuts
or leaves no time for is "skipped: deadline", and a matrix with no completed run fails. Run
folders, with their checkpoints, go to --work; --out receives table.txt, results.jsonl and
failures.log only.  --preflight and --pytest-args need only the standard library.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Mapping

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

GLOBAL_BATCH = 512  # keeps a GPU busier than the default 128; lr 4e-3 reaches 99% with it in 3 epochs
TRAIN_ARGS = ["optim.lr=4e-3", "train.epochs=3", "train.eval_every=20", "train.log_every=20", "wandb.mode=disabled",
              "checkpoint.keep=1"]
# Compiled rows measure throughput and CUDA-graph replays, not time to 99% (the eager rows do): 100
# steps (5 log windows: one of warm-up, four steady) after the compile, not 3 epochs' 352.
COMPILED_STEPS = 100
EAGER_TIMEOUT_S, COMPILED_TIMEOUT_S = 90, 150  # per run: start-up + ~350 steps (+ a cold compile)
MIN_RUN_S = 25  # a run with less time left than this is skipped, not started
# Seconds per row on one H200, to size the plan: measured 2026-12-04 (docs/gpu-check.md, first run)
# 12.5-14.8 s an eager row (start-up, 352 steps, 18 evaluations) and 26.6 s the compiled bf16 row
# (a cold reduce-overhead compile ~12 s + 100 steps), rounded up; torchrun's agent, rendezvous and
# NCCL's set-up ~10 s more (an estimate: no run on two GPUs yet).
EAGER_EST_S, COMPILED_EST_S, TORCHRUN_EXTRA_S = 16.0, 30.0, 10.0
PLAN_SHARE = 0.8  # the plan fills at most this share of its time: the estimates are guesses


@dataclass(frozen=True)
class Run:
    precision: str  # fp32 | bf16 | fp16
    compiled: bool  # torch.compile(mode="reduce-overhead"): CUDA graphs
    nproc: int = 1  # torchrun's --nproc_per_node; 0 = a plain python process

    @property
    def name(self) -> str:
        launch = f"torchrun{self.nproc}" if self.nproc else "python"
        return f"{self.precision}-{'graphs' if self.compiled else 'eager'}-{launch}"

    @property
    def estimate_s(self) -> float:
        return (COMPILED_EST_S if self.compiled else EAGER_EST_S) + (TORCHRUN_EXTRA_S if self.nproc else 0.0)

    @property
    def timeout_s(self) -> float:
        return COMPILED_TIMEOUT_S if self.compiled else EAGER_TIMEOUT_S


@dataclass(frozen=True)
class Plan:
    runs: tuple[Run, ...]
    left_out: tuple[tuple[str, str], ...]  # (run name, why)
    budget_s: float  # the time the plan was sized to, seconds

    @property
    def estimate_s(self) -> float:
        return sum(r.estimate_s for r in self.runs)

    def lines(self) -> list[str]:
        head = (f"plan: {len(self.runs)} runs, estimated {self.estimate_s:.0f} s of {max(0.0, self.budget_s):.0f} s "
                f"left (planned to {PLAN_SHARE:.0%} of it)")
        return [head, *(f"left out: {name}: {why}" for name, why in self.left_out)]


def matrix(gpus: int) -> list[Run]:
    """Every row, most informative first: eager as one process and under torchrun on all GPUs; then
    compiled bf16 both ways; then compiled fp32 and fp16."""
    launches = (0, gpus)
    runs = [Run(p, False, n) for n in launches for p in ("fp32", "bf16", "fp16")]
    runs += [Run("bf16", True, n) for n in launches]
    runs += [Run(p, True, n) for p in ("fp32", "fp16") for n in launches]
    return runs


def plan(gpus: int, budget_s: float, compile_blocker: str | None = None) -> Plan:
    """The rows of `matrix(gpus)` that can run here and fit PLAN_SHARE of budget_s (seconds), in
    order; each row left out comes with why. torchrun rows need >= 2 GPUs (on one they repeat
    the python rows); compiled rows need what `toolchain` checks (compile_blocker: why not)."""
    runs, left_out, spent = [], [], 0.0
    room = PLAN_SHARE * budget_s
    for run in matrix(gpus):
        if run.nproc and gpus < 2:
            why = f"{gpus} GPU: torchrun on one GPU repeats the python row (torchrun rows need >= 2 GPUs)"
        elif run.compiled and compile_blocker:
            why = f"compiled rows need {compile_blocker}"
        elif spent + run.estimate_s > room:
            why = (f"estimated {run.estimate_s:.0f} s, {max(0.0, room - spent):.0f} s left of the plan's "
                   f"{max(0.0, room):.0f} s")
        else:
            runs.append(run)
            spent += run.estimate_s
            continue
        left_out.append((run.name, why))
    return Plan(tuple(runs), tuple(left_out), budget_s)


def command(run: Run, data_root: str, run_dir: Path, python: str = sys.executable) -> list[str]:
    world = max(1, run.nproc)
    batch = GLOBAL_BATCH // world * world  # divisible by the world size
    args = [f"data.root={data_root}", f"run.dir={run_dir}", f"precision={run.precision}",
            f"train.batch_size={batch}", *TRAIN_ARGS]
    if run.compiled:
        args += ["train.compile=true", "train.compile_mode=reduce-overhead", f"train.max_steps={COMPILED_STEPS}"]
    launch = [python, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={run.nproc}"] \
        if run.nproc else [python]
    return [*launch, str(REPO / "train_ddp.py"), *args]


# ---- preflight: what the check needs, looked up before the first CUDA call

# (module, what needs it): each is imported by --preflight, one line each.
CHECK_IMPORTS = (("torch", "the trainer"), ("torchvision", "the MNIST download (data/mnist.py)"),
                 ("numpy", "data/mnist.py's IDX reader"), ("omegaconf", "the config (from the bundle)"),
                 ("yaml", "the config's YAML files"), ("tqdm", "the console's progress bar"),
                 ("filelock", "the tests' shared MNIST and run"),
                 ("pytest", "the tests"), ("cnn", "the project's package"), ("data", "the project's MNIST module"),
                 ("train_ddp", "the entry point and all it imports at start-up"))


def python_include_dir() -> str:
    """Where Triton looks for Python.h when it builds its launcher (triton/runtime/build.py `_build`:
    the default sysconfig scheme, Debian's posix_local read as posix_prefix)."""
    scheme = sysconfig.get_default_scheme()
    return sysconfig.get_paths(scheme="posix_prefix" if scheme == "posix_local" else scheme)["include"]


def toolchain(which: Callable[[str], str | None] = shutil.which, environ: Mapping[str, str] = os.environ,
              include_dir: Callable[[], str] = python_include_dir, isfile: Callable[[str], bool] = os.path.isfile,
              find_spec: Callable[[str], object] = importlib.util.find_spec) -> tuple[list[str], str | None]:
    """(one line per requirement, why compiled rows cannot run or None). Inductor's CUDA kernels
    are Triton's, and Triton compiles a C launcher for them on first use with $CC, else gcc, else
    clang (triton/runtime/build.py `_find_compiler`), against Python.h."""
    missing = []
    cc = environ.get("CC") or which("gcc") or which("clang")
    if cc:
        lines = [f"C compiler: {cc}"]
    else:
        lines = ["C compiler: MISSING ($CC unset, no gcc or clang in PATH): Triton cannot build its launcher"]
        missing.append("a C compiler ($CC, gcc or clang)")
    header = os.path.join(include_dir(), "Python.h")
    if isfile(header):
        lines.append(f"Python.h: {header}")
    else:
        lines.append(f"Python.h: MISSING ({header}; the python3-dev package): Triton cannot build its launcher")
        missing.append(f"Python.h ({header})")
    if find_spec("triton") is not None:
        lines.append("triton: importable")
    else:
        lines.append("triton: MISSING: torch.compile has no CUDA backend")
        missing.append("triton")
    return lines, (" and ".join(missing) or None)


def preflight(import_module: Callable[[str], object] = importlib.import_module,
              find_spec: Callable[[str], object] = importlib.util.find_spec,
              **lookups) -> tuple[list[str], list[str], str | None]:
    """(lines, modules that failed to import, compile_blocker): every import the check needs, then
    pytest-xdist (either way is fine: see pytest_args), then `toolchain`'s (lookups: its which,
    environ, include_dir and isfile)."""
    lines, missing = [f"python {sys.version.split()[0]} ({sys.executable})"], []
    for name, why in CHECK_IMPORTS:
        try:
            module = import_module(name)
        except Exception as exc:  # noqa: BLE001  a broken install raises more than ImportError
            lines.append(f"import {name}: MISSING ({type(exc).__name__}: {exc}); needed by {why}")
            missing.append(name)
            continue
        where = os.path.dirname(getattr(module, "__file__", None) or "?")
        lines.append(f"import {name}: {getattr(module, '__version__', 'ok')} ({where})")
    xdist = find_spec("xdist") is not None
    lines.append(f"pytest-xdist: {'installed' if xdist else 'absent'} (the check's tests run in one process "
                 f"either way: -p no:xdist)")
    tool_lines, blocker = toolchain(find_spec=find_spec, **lookups)
    lines += tool_lines
    lines.append(f"compiled rows: {'left out: they need ' + blocker if blocker else 'can run'}")
    return lines, missing, blocker


# ---- the check's pytest options

# pytest-xdist's options (pytest-xdist 3.x `pytest_addoption`): those that take a value, and flags.
XDIST_VALUE_OPTIONS = {"-n", "--numprocesses", "--maxprocesses", "--max-worker-restart", "--dist", "--tx",
                       "--rsyncdir", "--rsyncignore", "--maxschedchunk"}
XDIST_FLAGS = {"--no-loadscope-reorder", "--loadscope-reorder", "-d", "--distload", "-f", "--looponfail"}


def project_addopts(pyproject: Path = REPO / "pyproject.toml") -> list[str]:
    try:
        import tomllib
    except ImportError:  # Python 3.10: pytest depends on tomli there
        import tomli as tomllib
    opts = tomllib.loads(pyproject.read_text()).get("tool", {}).get("pytest", {}).get("ini_options", {})
    addopts = opts.get("addopts", "")
    return shlex.split(addopts) if isinstance(addopts, str) else list(addopts)


def without_xdist(args: list[str]) -> list[str]:
    """args less pytest-xdist's options and their values (-n 2, -n2, --dist loadfile, --dist=loadfile)."""
    kept, skip_value = [], False
    for arg in args:
        if skip_value:
            skip_value = False
        elif arg.split("=", 1)[0] in XDIST_VALUE_OPTIONS:
            skip_value = "=" not in arg
        elif not (arg in XDIST_FLAGS or (arg.startswith("-n") and not arg.startswith("--"))):
            kept.append(arg)
    return kept


def pytest_args(addopts: list[str]) -> list[str]:
    """The check's pytest options: one process (one GPU, and timings not shared with a second
    worker), the same whether or not pytest-xdist is installed. pyproject's addopts carry xdist's
    options, which pytest rejects ("unrecognized arguments") when xdist is absent or blocked, so
    they are dropped from addopts and the plugin is blocked; every other addopt is kept."""
    return ["-p", "no:cacheprovider", "-p", "no:xdist", "-o", f"addopts={shlex.join(without_xdist(addopts))}"]


# ---- running the matrix

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
    """One row: the summary's whole-run figures and its steady-state ones after warm-up (None where the
    trainer does not report them), and the median training window after the first (which holds the
    warm-up and any compilation) with its MFU against both peaks."""
    from cnn.perf import Roofline, throughput  # here: --preflight runs before torch is known to import

    median = statistics.median(window_ips[1:]) if len(window_ips) > 1 else summary["images_per_sec"]
    roof = Roofline(summary["peak_gflops"], summary.get("peak_datasheet_gflops"), summary.get("peak_basis", "?"))
    tp = throughput(int(median), 1.0, roof)
    return {"run": run.name, "status": "ok", "precision": run.precision, "compiled": run.compiled,
            "nproc": run.nproc, "images_per_sec": summary["images_per_sec"],
            "steady_images_per_sec": summary.get("steady_images_per_sec"), "steady_mfu": summary.get("steady_mfu"),
            "warmup_seconds": summary.get("warmup_seconds"), "median_window_images_per_sec": median,
            "seconds_to_99": summary["seconds_to_99"], "test_accuracy": summary["test_accuracy"],
            "mfu": tp["mfu"], "mfu_datasheet": tp["mfu_datasheet"], "peak_basis": roof.basis,
            "peak_gpu_mb": summary.get("peak_gpu_mb"), "cudagraph_replays": summary.get("cudagraph_replays"),
            "cudagraph_captures": summary.get("cudagraph_captures"),
            "cudagraph_reused": summary.get("cudagraph_replays_beyond_captures"),
            "cudagraph_skips": summary.get("cudagraph_skips"), "tf32_matmul": summary.get("tf32_matmul"),
            "tf32_cudnn": summary.get("tf32_cudnn"), "device_name": summary.get("device_name"),
            "wall_s": wall_s}


# img/s, steady, warm-up s, st. MFU: the summary's whole-run rate, its steady-state rate and MFU after
# warm-up, and the warm-up's excess seconds; median: the median window after the first, whose MFU
# against the measured and the datasheet peak MFU and MFU ds are.
HEADER = (f"{'run':<24} {'img/s':>8} {'steady':>8} {'warm-up s':>9} {'median':>8} {'s to 99%':>8} {'acc':>7} "
          f"{'st. MFU':>7} {'MFU':>6} {'MFU ds':>6} {'basis':>5} {'GPU MiB':>8}  CUDA graphs")


def table_line(row: dict) -> str:
    if row["status"] != "ok":
        return f"{row['run']:<24} {row['status']}"

    def pct(x):
        return "-" if x is None else f"{100 * x:.1f}%"

    def num(x, fmt):
        return "-" if x is None else format(x, fmt)

    # reused: replays beyond the captures (cudagraph trees replay each graph once right after recording
    # it, so a graph re-recorded every step has as many replays as captures: cnn/perf/cudagraphs.py GraphReplays)
    graphs = "-" if not row["compiled"] else (
        f"{'reused' if row.get('cudagraph_reused') else 'NOT reused'} ({row.get('cudagraph_captures')} captures, "
        f"{row['cudagraph_replays']} replays, {row.get('cudagraph_reused')} beyond them, {row['cudagraph_skips']} skips)")
    return (f"{row['run']:<24} {row['images_per_sec']:>8.0f} {num(row.get('steady_images_per_sec'), '.0f'):>8} "
            f"{num(row.get('warmup_seconds'), '.1f'):>9} {row['median_window_images_per_sec']:>8.0f} "
            f"{num(row['seconds_to_99'], '.1f'):>8} {row['test_accuracy']:>7.4f} {pct(row.get('steady_mfu')):>7} "
            f"{pct(row['mfu']):>6} {pct(row['mfu_datasheet']):>6} {row['peak_basis']:>5} "
            f"{num(row['peak_gpu_mb'], '.0f'):>8}  {graphs}")


# attempt(run, limit_s) -> (exit code or "timeout", log, the run's row when the code is 0)
Attempt = Callable[[Run, float], tuple[int | str, str, dict | None]]


def execute(runs: tuple[Run, ...] | list[Run], deadline_s: float, attempt: Attempt,
            clock: Callable[[], float] = time.monotonic) -> Iterator[tuple[dict, str]]:
    """(row, log) of each run in order. A run gets its own timeout or what is left before the
    deadline, whichever is less; one with under MIN_RUN_S left is not started, and one that the
    deadline (not its own timeout) cut is "skipped: deadline" too: the earlier steps took its time,
    it did not fail."""
    deadline = clock() + deadline_s
    for run in runs:
        left = deadline - clock()
        if left < MIN_RUN_S:
            yield {"run": run.name, "status": f"skipped: deadline ({max(0.0, left):.0f} s left, a run needs "
                                              f"{MIN_RUN_S} s)"}, ""
            continue
        limit = min(run.timeout_s, left)
        code, log, row = attempt(run, limit)
        if code == 0 and row is not None:
            yield row, log
        elif code == "timeout" and limit < run.timeout_s:
            yield {"run": run.name, "status": f"skipped: deadline (cut after {limit:.0f} s)"}, log
        else:
            why = f"timed out after {limit:.0f} s" if code == "timeout" else f"exit {code}"
            yield {"run": run.name, "status": f"FAILED ({why})"}, log


def verdict(rows: list[dict], left_out: int = 0) -> tuple[int, str]:
    """(exit code, one line): any failed run fails the check, and so does a matrix with no completed
    run (every row skipped or left out: no figures)."""
    ok = [r for r in rows if r["status"] == "ok"]
    failed = [r["run"] for r in rows if r["status"].startswith("FAILED")]
    skipped = len(rows) - len(ok) - len(failed)
    if failed:
        return 1, f"error: {len(failed)} of {len(rows)} runs failed ({', '.join(failed)}): see failures.log"
    if not ok:
        return 1, (f"error: no trainer run completed ({skipped} skipped by the deadline, {left_out} left out of "
                   f"the plan): the steps before the runs left too little of the time budget; no figures")
    return 0, f"{len(ok)} of {len(rows)} runs completed, {skipped} skipped by the deadline, {left_out} left out"


def run_matrix(p: Plan, deadline_s: float, out: Path, attempt: Attempt,
               clock: Callable[[], float] = time.monotonic) -> int:
    """Runs the plan, printing and writing each row as it ends; table.txt ends with what was left
    out and the verdict. Returns the verdict's exit code (its line goes to stderr too)."""
    out.mkdir(parents=True, exist_ok=True)
    table, results, failures = out / "table.txt", out / "results.jsonl", out / "failures.log"
    for path in (results, failures):
        path.write_text("")

    def emit(line: str, tf) -> None:
        print(line, flush=True)
        tf.write(line + "\n")

    rows = []
    with open(table, "w") as tf:
        for line in p.lines():
            print(line, flush=True)
        emit(HEADER, tf)
        for row, log in execute(p.runs, deadline_s, attempt, clock):
            rows.append(row)
            emit(table_line(row), tf)
            with open(results, "a") as rf:
                rf.write(json.dumps(row) + "\n")
            if row["status"] != "ok" and log:
                with open(failures, "a") as ff:
                    ff.write(f"==== {row['run']}: {row['status']}\n" + "\n".join(log.splitlines()[-40:]) + "\n")
        for name, why in p.left_out:
            tf.write(f"left out: {name}: {why}\n")
        code, line = verdict(rows, len(p.left_out))
        tf.write(line + "\n")
    print(line, file=sys.stderr if code else sys.stdout, flush=True)
    return code


def trainer_attempt(data_root: str, work: Path) -> Attempt:
    """The real attempt: train_ddp.py under `command`, its row read from the run folder."""
    from cnn.rundir import read_metrics, read_summary  # here: --preflight runs before torch is known to import

    def attempt(run: Run, limit_s: float) -> tuple[int | str, str, dict | None]:
        run_dir = work / run.name
        t0 = time.monotonic()
        code, log = launch(command(run, data_root, run_dir), limit_s)
        if code != 0:
            return code, log, None
        ips = [r["images_per_sec"] for r in read_metrics(run_dir, "train")]
        return code, log, result(run, read_summary(run_dir), ips, time.monotonic() - t0)

    return attempt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="datasets", help="data.root holding MNIST")
    parser.add_argument("--work", type=Path, help="scratch folder for the run folders (checkpoints)")
    parser.add_argument("--out", type=Path, help="where table.txt, results.jsonl and failures.log go")
    parser.add_argument("--gpus", type=int, help="torchrun's --nproc_per_node (default: all visible GPUs)")
    parser.add_argument("--deadline-s", type=float, default=240.0, help="seconds for all runs together")
    parser.add_argument("--plan", action="store_true", help="print the plan (what runs, what is left out) and stop")
    parser.add_argument("--commands", action="store_true", help="with --plan: each run's command line too")
    parser.add_argument("--preflight", action="store_true", help="check imports, C compiler and Python.h; stop")
    parser.add_argument("--pytest-args", action="store_true", help="print the check's pytest options; stop")
    args = parser.parse_args(argv)
    if args.pytest_args:
        print("\n".join(pytest_args(project_addopts())))
        return 0
    if args.preflight:
        lines, missing, _ = preflight()
        print("\n".join(f"preflight: {line}" for line in lines), flush=True)
        if missing:
            print(f"error: preflight: cannot import {', '.join(missing)} (lines above)", file=sys.stderr)
        return 1 if missing else 0
    if args.gpus is None:
        import torch

        args.gpus = max(1, torch.cuda.device_count())
    p = plan(args.gpus, args.deadline_s, toolchain()[1])
    if args.plan:
        trainer_attempt(args.data, Path("RUN_DIR"))  # its imports, as the run would make them
        print("\n".join(p.lines()))
        for run in p.runs:
            cmd = f"  {' '.join(command(run, args.data, Path('RUN_DIR'), 'python3'))}" if args.commands else ""
            print(f"run: {run.name:<24} ~{run.estimate_s:.0f} s{cmd}")
        return 0
    if args.work is None or args.out is None:
        parser.error("--work and --out are needed to run")
    return run_matrix(p, args.deadline_s, args.out, trainer_attempt(args.data, args.work))


if __name__ == "__main__":
    sys.exit(main())
