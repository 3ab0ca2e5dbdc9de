"""Rerun every transcript the docs show and write them to docs/transcripts.md.

    python docs/make_transcripts.py                 # ~2 minutes on 2 CPU cores
    python docs/make_transcripts.py --keep /tmp/t   # keep the runs and files it made

It trains small runs (5,120 training images, 40 steps of the default global batch of 128, W&B
disabled) in a scratch folder, then runs the commands used after training on them, and writes
each command with its output as the terminal shows it (stdout and stderr together). The header
names the date, the CPU (`lscpu`'s model name and its bf16-relevant flags), torch and the commit:
the figures are this machine's and a 40-step run's, not the default recipe's (docs/performance.md
has those). The commands after training are run as ``python -m cnn.cli COMMAND``, which is what
the ``mnist-ddp`` console script runs; the transcript writes them as ``mnist-ddp COMMAND``.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
PAGE = REPO / "docs" / "transcripts.md"
TEST_IMAGES = Path("MNIST/raw/t10k-images-idx3-ubyte")

# The small run every transcript starts from: 40 optimizer steps, one pass over 5,120 images.
SMALL = ["data.train_subset=5120", "train.epochs=1", "wandb.mode=disabled"]
# The runs that evaluate and compare read also test every 10 steps, so the curves have points.
CURVES = [*SMALL, "train.eval_every=10"]

# Launcher variables of the shell this runs in must not reach the runs it starts.
LAUNCHER_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                 "GROUP_RANK", "GROUP_WORLD_SIZE")


def cpu_line() -> str:
    """`lscpu`'s model name, core count and the CPU flags that decide bf16 (cnn/precision.py)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        out = ""
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    model = fields.get("Model name", platform.processor() or "unknown CPU").strip()
    flags = set(fields.get("Flags", "").split())
    wanted = ["avx2", "avx512f", "avx512_bf16"] + sorted(f for f in flags if f.startswith("amx"))
    shown = ", ".join(f if f in flags else f"no {f}" for f in wanted)
    if not any(f.startswith("amx") for f in flags):
        shown += ", no amx"
    return f"{model}, {os.cpu_count()} CPUs ({shown})"


def commit() -> str:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True).stdout.strip()

    head = git("rev-parse", "--short", "HEAD") or "unknown"
    return head + (" with uncommitted changes" if git("status", "--porcelain", "--untracked-files=no") else "")


def torch_version() -> str:
    out = subprocess.run([sys.executable, "-c", "import torch; print(torch.__version__)"],
                         capture_output=True, text=True)
    return out.stdout.strip() or "unknown"


def write_digits(data_root: Path, dest: Path) -> None:
    """Test images 0-2 as 28x28 PNGs, and image 3 as a scan would give it: dark ink on light
    paper, 160x200 pixels, JPEG."""
    from PIL import Image

    raw = (data_root / TEST_IMAGES).read_bytes()
    images = np.frombuffer(raw, dtype=np.uint8, offset=16).reshape(-1, 28, 28)
    dest.mkdir(parents=True, exist_ok=True)
    for i in range(3):
        Image.fromarray(images[i]).save(dest / f"test-{i}.png")
    Image.fromarray(255 - images[3]).resize((160, 200), Image.BILINEAR).save(dest / "scan.jpg", quality=90)


def drop_config_dump(text: str) -> str:
    """The trainer prints its resolved config (~80 lines) between two markers: keep one line for it."""
    return re.sub(r"--- resolved config ---\n.*?\n---\n", "--- resolved config --- (omitted here: run.dir/config.yaml)\n",
                  text, flags=re.S)


def profile_table(text: str) -> str:
    """From `profile of steps ...` to the end of its operator table."""
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("profile of steps")), len(lines))
    end = start + 1
    while end < len(lines) and lines[end].startswith("  "):
        end += 1
    return "\n".join(lines[start:end])


class Transcript:
    def __init__(self, cwd: Path, env: dict[str, str]):
        self.cwd, self.env = cwd, env
        self.parts: list[str] = []  # the commands of the section being written
        self.blocks: list[str] = []  # finished sections

    def run(self, shown: str, argv: list[str], fails: bool = False, keep=lambda text: text) -> str:
        """Run argv in the scratch folder, check that it succeeds (or, with `fails`, that it fails),
        record `$ shown` and its output (and a failure's exit code)."""
        t0 = time.time()
        proc = subprocess.run(argv, cwd=self.cwd, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True)
        out = proc.stdout
        print(f"{time.time() - t0:6.1f} s  exit {proc.returncode}  {shown}", file=sys.stderr)
        if (proc.returncode != 0) != fails:
            sys.exit(f"`{shown}` exited {proc.returncode}, expected {'a failure' if fails else 0}:\n{out}")
        kept = keep(out).rstrip()
        if not kept:
            sys.exit(f"`{shown}` printed nothing that this transcript shows:\n{out}")
        code = f"\n[exit code {proc.returncode}]" if fails else ""
        self.parts.append(f"$ {shown}\n{kept}{code}")
        return out

    def section(self, title: str, text: str) -> None:
        body = "\n".join(self.parts)
        self.parts = []
        self.blocks.append(f"## {title}\n\n{text}\n\n```\n{body}\n```\n")


def make(scratch: Path, data_root: Path) -> str:
    (scratch / "datasets").symlink_to(data_root.resolve(), target_is_directory=True)
    write_digits(data_root, scratch / "digits")
    env = {k: v for k, v in os.environ.items()
           if k not in LAUNCHER_VARS and not k.startswith(("SLURM_", "TORCHELASTIC_", "WANDB_"))}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    py, trainer = [sys.executable], str(REPO / "train_ddp.py")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cli = [sys.executable, "-m", "cnn.cli"]
    small, curves = " ".join(SMALL), " ".join(CURVES)
    t = Transcript(scratch, env)

    t.run(f"python train_ddp.py {curves} run.dir=runs/demo", py + [trainer, *CURVES, "run.dir=runs/demo"],
          keep=drop_config_dump)
    t.run(f"torchrun --standalone --nproc_per_node=2 train_ddp.py {curves} run.dir=runs/2rank",
          torchrun + [trainer, *CURVES, "run.dir=runs/2rank"], keep=drop_config_dump)
    t.section("The runs", "Two small runs of the default config (40 steps instead of 234): one process, and two "
              "ranks under torchrun. The sections below use them.")

    t.run("mnist-ddp evaluate runs/demo", cli + ["evaluate", "runs/demo"])
    t.section("evaluate", "The final checkpoint of `runs/demo`, on all 10,000 test images, in the precision the run "
              "computed in (the line under the accuracy header says which and why).")

    t.run("mnist-ddp predict runs/demo digits/test-0.png digits/test-1.png digits/test-2.png",
          cli + ["predict", "runs/demo", "digits/test-0.png", "digits/test-1.png", "digits/test-2.png"])
    t.run("mnist-ddp predict runs/demo digits/scan.jpg --invert --format csv",
          cli + ["predict", "runs/demo", "digits/scan.jpg", "--invert", "--format", "csv"])
    t.run("mnist-ddp predict runs/demo digits/scan.jpg", cli + ["predict", "runs/demo", "digits/scan.jpg"], fails=True)
    t.section("predict", "`digits/test-0.png` ... `test-2.png` are test images 0-2 saved as 28x28 PNGs; "
              "`digits/scan.jpg` is test image 3 as dark ink on light paper, 160x200, JPEG.")

    t.run("mnist-ddp export runs/demo", cli + ["export", "runs/demo"])
    t.run("mnist-ddp export runs/demo", cli + ["export", "runs/demo"], fails=True)
    t.section("export", "Each file is loaded back and compared with PyTorch before anything is written; a second "
              "export refuses to overwrite without `--force`.")

    t.run("mnist-ddp compare runs/demo runs/2rank --out runs/compare-1v2",
          cli + ["compare", "runs/demo", "runs/2rank", "--out", "runs/compare-1v2"])
    t.section("compare", "One process (2 threads) against two ranks (1 thread each), the same batches.")

    steps = "train.profile_steps=[20,21]"
    t.run(f"torchrun --standalone --nproc_per_node=2 train_ddp.py {small} {steps} run.dir=runs/profile-demo",
          torchrun + [trainer, *SMALL, steps, "run.dir=runs/profile-demo"],
          keep=profile_table)
    t.section("profile", "Global steps 20-21 under torch.profiler on every rank; rank 0 prints its top operators. "
              "Only that table is kept here (the run's other lines are the ones above, and the profiler's own "
              "notices).")

    slow = ["train.log_every=10", "train.debug_delay_ms=150", "train.debug_delay_rank=1"]
    t.run(f"torchrun --standalone --nproc_per_node=2 train_ddp.py {small} {' '.join(slow)} run.dir=runs/slow-rank",
          torchrun + [trainer, *SMALL, *slow, "run.dir=runs/slow-rank"],
          keep=lambda text: "\n".join(line for line in text.splitlines() if line.startswith("warning: straggler")))
    t.section("A straggler", "Rank 1 sleeps 150 ms in every backward; only the warning lines are kept.")

    t.run("python train_ddp.py optim.learning_rate=0.002", py + [trainer, "optim.learning_rate=0.002"], fails=True)
    t.run("python train_ddp.py --optim.lr 0.002", py + [trainer, "--optim.lr", "0.002"], fails=True)
    t.section("Config errors", "A misspelt key, and another tool's habit.")

    header = (f"# Transcripts\n\nGenerated by `python docs/make_transcripts.py` on "
              f"{datetime.date.today().isoformat()}: {cpu_line()}; torch {torch_version()}; "
              f"Python {platform.python_version()}; commit {commit()}.\n\n"
              "Do not edit by hand: rerun the script. The runs are 40 steps, not the default recipe's 234, so "
              "their accuracy is lower and their timings are this machine's at that moment; "
              "[performance.md](performance.md) has the measured figures of the default recipe.\n")
    return header + "\n" + "\n".join(t.blocks)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", type=Path, default=Path(os.environ.get("MNIST_ROOT", REPO / "datasets")),
                        help="a verified MNIST folder (python -m data.prepare --root DIR makes one)")
    parser.add_argument("--keep", type=Path, help="make the runs here (an empty or new folder) and keep them")
    parser.add_argument("--out", type=Path, default=PAGE, help=f"the page to write (default {PAGE.relative_to(REPO)})")
    args = parser.parse_args(argv)
    if not (args.data_root / TEST_IMAGES).is_file():
        sys.exit(f"error: no MNIST in {args.data_root}: run python -m data.prepare --root {args.data_root}")
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
        if any(args.keep.iterdir()):
            sys.exit(f"error: {args.keep} is not empty")
    scratch = args.keep or Path(tempfile.mkdtemp(prefix="mnist-ddp-transcripts-"))
    try:
        page = make(scratch, args.data_root)
    finally:
        if not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)
    args.out.write_text(page)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
