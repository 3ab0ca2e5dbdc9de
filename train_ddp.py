"""Train the seed CNN on MNIST with DistributedDataParallel.

One script for every launcher:

    python train_ddp.py                                  # one process, CPU (or one GPU)
    python train_ddp.py --config configs/default.yaml train.epochs=3 optim.lr=1e-3
    torchrun --standalone --nproc_per_node=8 train_ddp.py            # one node, 8 GPUs (or CPU procs)
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d \\
        --rdzv-endpoint=HOST:29500 --rdzv-id=JOB train_ddp.py        # run on each of 2 nodes
    sbatch slurm/multinode_torchrun.sbatch                           # SLURM (see slurm/)

The global batch (train.batch_size) is split evenly over the ranks, so results
do not depend on how many processes share the work.  Outputs go to run.dir:
config.yaml, metrics.jsonl, summary.json, checkpoints/.  Exit codes: 0 done,
1 error, 2 bad configuration, 143 stopped by SIGTERM after a checkpoint
(re-run with the same run.dir to resume).
"""

from __future__ import annotations

import hashlib
import math
import os
import resource
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from cnn import checkpoint, config, distributed, perf, precision
from cnn.config import Config, ConfigError
from cnn.evaluate import evaluate
from cnn.model import CNN
from cnn.optim import build_optimizer, lr_at
from cnn.tracking import make_tracker
from data import mnist
from data.sharding import DeviceDataset, batch_indices, epoch_indices, steps_per_epoch

EXIT_STOPPED = 143  # 128 + SIGTERM: stopped early with a checkpoint
STOP_CHECK_EVERY = 10  # steps between the collective that agrees on a SIGTERM stop
# Keys that must match between a checkpoint and the resuming run: anything else
# would silently make a different training run.
RESUME_MUST_MATCH = ("seed", "model", "optim", "data.train_subset", "train.batch_size", "train.epochs")


class StopRequest:
    """Set by SIGTERM (torchrun, SLURM); read at step boundaries."""

    def __init__(self) -> None:
        self.requested = False
        signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame) -> None:
        # Repeats are expected (slurmstepd and the torchrun agent may both forward one);
        # torchrun and SLURM escalate to SIGKILL themselves if we never reach a step boundary.
        self.requested = True


class Window:
    """Train loss and accuracy summed on the device between log points: no host sync per step."""

    def __init__(self, device: torch.device) -> None:
        self.loss = torch.zeros((), device=device)
        self.correct = torch.zeros((), device=device, dtype=torch.long)
        self.steps = 0
        self.clock = perf.Clock(device)

    def add(self, loss: torch.Tensor, logits: torch.Tensor, y: torch.Tensor) -> None:
        self.loss += loss.detach().float()
        self.correct += (logits.argmax(dim=1) == y).sum()
        self.steps += 1

    def close(self, world_size: int, global_batch: int) -> tuple[float, float, int, float]:
        """(mean train loss, accuracy, images, seconds) over all ranks since the last close."""
        sums = torch.stack([self.loss, self.correct.float()])
        dist.all_reduce(sums)  # the whole job's figures, not rank 0's
        loss = sums[0].item() / (self.steps * world_size)
        if not math.isfinite(loss):
            raise FloatingPointError(f"non-finite training loss ({loss}) in the last {self.steps} steps")
        acc, images = sums[1].item() / (self.steps * global_batch), self.steps * global_batch
        seconds = self.clock.seconds()
        self.loss.zero_(), self.correct.zero_()
        self.steps = 0
        return loss, acc, images, seconds

    def restart_clock(self) -> None:
        """Evaluation and checkpointing are not training time."""
        self.clock.restart()


def step_seed(seed: int, step: int, rank: int) -> int:
    """Dropout masks are a pure function of (seed, step, rank): resume needs no RNG state."""
    return (seed * 1_000_003 + step) * 1_009 + rank


def resolve_run_dir(cfg: Config) -> Path:
    """run.dir, or runs/<job id>: the SLURM job id or torchrun run id survive restarts."""
    if cfg.run.dir:
        return Path(cfg.run.dir)
    job = os.environ.get("SLURM_JOB_ID") or os.environ.get("TORCHELASTIC_RUN_ID", "")
    if job in ("", "none"):
        job = time.strftime("%Y%m%d-%H%M%S")
    return Path("runs") / job


def prepare_data(cfg: Config, d: distributed.Dist) -> None:
    """Local rank 0 of each node acquires MNIST; the others wait, and learn if it failed."""
    error = ""
    if d.local_rank == 0:
        try:
            mnist.ensure(cfg.data.root, cfg.data.download, log=lambda m: print(f"[node {d.node_rank}] {m}", flush=True))
        except Exception as exc:
            error = f"{exc}"
    failed = distributed.agree_any(bool(error), cfg.dist.data_timeout_s)
    if error:
        raise mnist.DataError(error)
    if failed:
        raise mnist.DataError("MNIST preparation failed on another node (see its log)")


def check_resume_config(state: dict, cfg: Config, path_hint: str) -> None:
    saved, now = state["config"], config.to_dict(cfg)
    for key in RESUME_MUST_MATCH:
        a, b = saved, now
        for part in key.split("."):
            a, b = a.get(part), b.get(part)
        if a != b:
            raise checkpoint.CheckpointError(
                f"{path_hint}: {key} was {a} when saved but is {b} now; use a new run.dir or checkpoint.resume=never"
            )


def load_resume_state(cfg: Config, d: distributed.Dist, run_dir: Path) -> dict | None:
    """Rank 0 picks and reads the checkpoint, then broadcasts it (nodes need not share a filesystem)."""
    payload: dict | str | None = None
    if d.is_main:
        try:
            payload = checkpoint.find_resume(
                cfg.checkpoint.resume, run_dir, lambda sd: CNN().load_state_dict(sd), lambda m: print(f"warning: {m}", file=sys.stderr)
            )
            if payload is not None:
                check_resume_config(payload, cfg, str(cfg.checkpoint.resume if cfg.checkpoint.resume != "auto" else run_dir))
        except checkpoint.CheckpointError as exc:
            payload = str(exc)
    payload = distributed.broadcast_object(payload)
    if isinstance(payload, str):
        raise checkpoint.CheckpointError(payload)
    return payload


def maybe_fault(cfg: Config, d: distributed.Dist, step: int) -> None:
    """checkpoint.fault_step: rehearse a failure on the first attempt only."""
    c = cfg.checkpoint
    first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0" and os.environ.get("SLURM_RESTART_COUNT", "0") == "0"
    if c.fault_step and step == c.fault_step and d.rank == c.fault_rank and first_attempt:
        print(f"fault injection: rank {d.rank} {c.fault_kind}s at step {step}", file=sys.stderr, flush=True)
        if c.fault_kind == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        raise RuntimeError(f"fault injection at step {step} (checkpoint.fault_step)")


def samples_digest(idx: torch.Tensor, world_size: int) -> str:
    """Hash of the sorted global batch (all ranks' indices): equal at every world size."""
    gathered = [torch.empty_like(idx) for _ in range(world_size)]
    dist.all_gather(gathered, idx)
    union = torch.cat(gathered).sort().values.cpu().numpy().astype("<i8")
    return hashlib.sha1(union.tobytes()).hexdigest()[:16]


def git_commit() -> str:
    """The code's commit, for filtering runs in W&B ('' outside a git checkout)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip() if out.returncode == 0 else ""
    except (OSError, subprocess.SubprocessError):
        return ""


def peak_rss_mb(d: distributed.Dist) -> float:
    """The largest peak resident memory of any rank, in MiB."""
    t = torch.tensor([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024], dtype=torch.float64, device=d.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def train(cfg: Config, d: distributed.Dist, stop: StopRequest) -> int:
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    if d.device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: pick the fastest conv kernels once
    run_dir = Path(distributed.broadcast_object(str(resolve_run_dir(cfg))))
    log = distributed.print0
    log(f"world size {d.world_size} ({d.launcher}, {d.num_nodes} node(s)), backend {d.backend}, device {d.device}")

    # ---- data: resident on the device, normalized once
    prepare_data(cfg, d)
    train_x, train_y = mnist.load(cfg.data.root, train=True)
    if cfg.data.train_subset:
        train_x, train_y = train_x[: cfg.data.train_subset], train_y[: cfg.data.train_subset]
    train_set = DeviceDataset.from_uint8(train_x, train_y, d.device, cfg.train.channels_last)
    test_x, test_y = mnist.load(cfg.data.root, train=False)  # kept for the prediction figures at the end
    test_set = DeviceDataset.from_uint8(test_x, test_y, d.device, cfg.train.channels_last)
    global_batch = cfg.train.batch_size
    per_rank = global_batch // d.world_size
    spe = steps_per_epoch(len(train_set), global_batch)
    total_steps = cfg.train.epochs * spe
    if cfg.train.max_steps:
        total_steps = min(total_steps, cfg.train.max_steps)

    # ---- model, optimizer, precision; keep `raw` for evaluation and checkpoints
    torch.manual_seed(cfg.seed)
    raw = CNN(cfg.model.dropout).to(d.device)
    if cfg.train.channels_last:
        raw = raw.to(memory_format=torch.channels_last)
    opt = build_optimizer(raw.parameters(), cfg.optim, d.device)
    prec = precision.build(cfg.precision, d.device)
    # cumulative over restarts (saved in checkpoints); epoch_start = (train_seconds, images) when the epoch began
    history = {"train_seconds": 0.0, "images": 0, "best_test_accuracy": 0.0, "seconds_to_99": None, "epoch_start": (0.0, 0)}
    start_step = 0
    state = load_resume_state(cfg, d, run_dir)
    if state is not None:
        raw.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        prec.scaler.load_state_dict(state["scaler"])
        start_step, history = state["step"], state.get("history", history)
        log(f"resumed from step {start_step} (epoch {state['epoch']}, step {state['step_in_epoch']} of it), "
            f"saved at world size {state.get('world_size')}")
    ddp = DDP(
        raw,
        device_ids=[d.device.index] if d.device.type == "cuda" else None,
        gradient_as_bucket_view=True,  # gradients live in the all-reduce buckets: no copy
        static_graph=True,  # same graph every step: lets DDP skip per-step unused-parameter search
    )
    model = torch.compile(ddp, mode=cfg.train.compile_mode) if cfg.train.compile else ddp

    # ---- outputs
    config_dict = config.to_dict(cfg)
    peak = perf.matmul_peak_gflops(d.device, torch.bfloat16 if prec.name == "bf16" else torch.float32)
    peak_t = torch.tensor([peak], dtype=torch.float64, device=d.device)
    dist.all_reduce(peak_t)  # the job's roofline: every rank's share of the machine(s)
    peak_gflops = float(peak_t.item())
    facts = {
        "world_size": d.world_size, "nodes": d.num_nodes, "backend": d.backend, "launcher": d.launcher,
        "device_name": torch.cuda.get_device_name(d.device) if d.device.type == "cuda" else "cpu",
        "precision": prec.name, "global_batch_size": global_batch, "per_rank_batch_size": per_rank,
        "torch_version": torch.__version__, "threads_per_rank": torch.get_num_threads(),
        "peak_gflops": peak_gflops, "steps_per_epoch": spe, "total_steps": total_steps, "git_commit": git_commit(),
    }
    # where every rank runs: (rank, host, SLURM node id) - shows that all nodes took part
    placement = [None] * d.world_size
    dist.all_gather_object(placement, (d.rank, socket.gethostname(), os.environ.get("SLURM_NODEID")))
    facts["hosts"] = sorted({host for _, host, _ in placement})
    facts["slurm_node_ids"] = sorted({int(n) for _, _, n in placement if n is not None})
    group = os.environ.get("SLURM_JOB_ID") or os.environ.get("TORCHELASTIC_RUN_ID", "")
    if d.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(config.to_yaml(cfg))
        log(f"run dir {run_dir}\n--- resolved config ---\n{config.to_yaml(cfg)}---")
    tracker = make_tracker(d.is_main, run_dir, cfg.wandb, {**config_dict, **facts}, "" if group == "none" else group)
    exit_code = 1
    try:
        if state is not None:
            tracker.truncate_after(start_step)
        tracker.log({"event": "start", "step": start_step, "epoch": start_step // spe, **facts}, stream=False)  # in W&B's config

        def save_checkpoint(step: int) -> None:
            if d.is_main:
                path = checkpoint.save(
                    {
                        "model": raw.state_dict(), "optimizer": opt.state_dict(), "scaler": prec.scaler.state_dict(),
                        "step": step, "epoch": step // spe, "step_in_epoch": step % spe, "config": config_dict,
                        "history": history, "world_size": d.world_size, "wandb_run_id": tracker.run_id,
                    },
                    run_dir,
                    cfg.checkpoint.keep,
                )
                log(f"checkpoint {path}")

        def run_eval(keep_predictions: bool = False):
            ev = evaluate(raw, test_set, d.rank, d.world_size, cfg.train.eval_batch_size, prec.autocast,
                          keep_predictions=keep_predictions)
            history["best_test_accuracy"] = max(history["best_test_accuracy"], ev.accuracy)
            if ev.accuracy >= 0.99 and history["seconds_to_99"] is None:
                history["seconds_to_99"] = history["train_seconds"]  # training time only, evaluations excluded
            return ev

        def end_epoch(step: int, epoch: int, train_loss: float, train_acc: float, say):
            ev = run_eval(keep_predictions=step == total_steps)  # the last one is also the final evaluation
            epoch_seconds = history["train_seconds"] - history["epoch_start"][0]
            epoch_tp = perf.throughput(history["images"] - history["epoch_start"][1], epoch_seconds, peak_gflops)
            history["epoch_start"] = (history["train_seconds"], history["images"])
            tracker.log({"event": "epoch", "step": step, "epoch": epoch, "train_loss": train_loss,
                         "train_accuracy": train_acc, "test_loss": ev.loss, "test_accuracy": ev.accuracy,
                         "eval_count": ev.count, "epoch_seconds": epoch_seconds, **epoch_tp})
            say(f"epoch {epoch} step {step}: train loss {train_loss:.4f} acc {train_acc:.4f} | "
                f"test loss {ev.loss:.4f} acc {ev.accuracy:.4f} ({ev.count} images) | "
                f"{epoch_tp['images_per_sec']:.0f} img/s, {epoch_seconds:.1f} s")
            save_checkpoint(step)
            return ev

        # ---- the loop
        bar = tqdm(total=total_steps, initial=start_step, disable=not (d.is_main and sys.stdout.isatty()), unit="step")
        say = bar.write if not bar.disable else log
        window, share, share_epoch, last_ev = Window(d.device), None, -1, None
        step = start_step
        while step < total_steps:
            epoch, s = divmod(step, spe)
            if share_epoch != epoch:
                share, share_epoch = epoch_indices(len(train_set), d.rank, d.world_size, cfg.seed, epoch).to(d.device), epoch
            maybe_fault(cfg, d, step)
            idx = batch_indices(share, s, per_rank)
            x, y = train_set.images[idx], train_set.labels[idx]
            for group_ in opt.param_groups:
                group_["lr"] = lr_at(step, total_steps, cfg.optim)
            torch.manual_seed(step_seed(cfg.seed, step, d.rank))
            with prec.autocast():
                logits = model(x)
                loss = F.cross_entropy(logits, y)
            prec.scaler.scale(loss).backward()
            prec.scaler.step(opt)
            prec.scaler.update()
            opt.zero_grad(set_to_none=True)
            window.add(loss, logits, y)
            step += 1
            bar.update(1)
            if cfg.train.record_samples:
                tracker.log({"event": "samples", "step": step, "epoch": epoch, "samples": samples_digest(idx, d.world_size)},
                            stream=False)

            epoch_end = step % spe == 0 or step == total_steps
            mid_eval = bool(cfg.train.eval_every) and step % cfg.train.eval_every == 0 and not epoch_end
            if step % cfg.train.log_every == 0 or epoch_end or mid_eval:
                train_loss, train_acc, images, seconds = window.close(d.world_size, global_batch)
                history["train_seconds"] += seconds
                history["images"] += images
                rec = {"step": step, "epoch": epoch, "train_loss": train_loss, "train_accuracy": train_acc,
                       "lr": opt.param_groups[0]["lr"], **perf.throughput(images, seconds, peak_gflops)}
                tracker.log(rec)
                bar.set_postfix(loss=f"{train_loss:.4f}", acc=f"{train_acc:.3f}")
                if bar.disable and not epoch_end:
                    say(f"step {step}/{total_steps} epoch {epoch} loss {train_loss:.4f} acc {train_acc:.4f} "
                        f"lr {rec['lr']:.2e} {rec['images_per_sec']:.0f} img/s")
                if mid_eval:
                    ev = run_eval()
                    tracker.log({"event": "eval", "step": step, "epoch": epoch, "test_loss": ev.loss,
                                 "test_accuracy": ev.accuracy, "eval_count": ev.count})
                if epoch_end:
                    last_ev = end_epoch(step, epoch, train_loss, train_acc, say)
                window.restart_clock()
            if cfg.checkpoint.every_steps and step % cfg.checkpoint.every_steps == 0 and not epoch_end:
                save_checkpoint(step)
            if step % STOP_CHECK_EVERY == 0 and step < total_steps and distributed.all_agree(stop.requested, d.device):
                save_checkpoint(step)
                say(f"SIGTERM: stopped at step {step} with a checkpoint; re-run with run.dir={run_dir} to resume")
                exit_code = EXIT_STOPPED
                return exit_code
        bar.close()

        # ---- final evaluation and summary
        # the last epoch's evaluation; a run that started at its final step (a finished run re-run) evaluates here
        ev = last_ev if last_ev is not None and last_ev.predictions is not None else evaluate(
            raw, test_set, d.rank, d.world_size, cfg.train.eval_batch_size, prec.autocast, keep_predictions=True)
        shards = [None] * d.world_size
        dist.all_gather_object(shards, ev.predictions.cpu())  # rank order = test-set order
        if d.is_main:
            tracker.predictions(test_x, test_y, torch.cat(shards))
        summary = {
            "test_accuracy": ev.accuracy, "test_loss": ev.loss, "eval_count": ev.count,
            "best_test_accuracy": max(history["best_test_accuracy"], ev.accuracy),
            "seconds_to_99": history["seconds_to_99"], "epochs": total_steps / spe, "steps": total_steps,
            "train_seconds": history["train_seconds"], "images": history["images"], "peak_rss_mb": peak_rss_mb(d),
            **perf.throughput(history["images"], history["train_seconds"], peak_gflops),
            **facts, "run_dir": str(run_dir),
        }
        tracker.summary(summary)
        log(f"done: test accuracy {ev.accuracy:.4f} ({ev.count} images), {summary['images_per_sec']:.0f} img/s, "
            f"{history['train_seconds']:.1f} s training; {run_dir / 'summary.json'}")
        exit_code = 0
        return exit_code
    finally:
        tracker.finish(exit_code)


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = config.parse_args(argv)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr, flush=True)
        return 2
    stop = StopRequest()
    try:
        d = distributed.setup(cfg.device, cfg.dist.timeout_s)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    try:
        return train(cfg, d, stop)
    except (mnist.DataError, checkpoint.CheckpointError, FloatingPointError) as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 1
    finally:
        distributed.cleanup()


if __name__ == "__main__":
    sys.exit(main())
