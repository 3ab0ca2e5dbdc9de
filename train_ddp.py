"""Train the seed CNN on MNIST with DistributedDataParallel.

One script for every launcher:

    python train_ddp.py                                  # one process, CPU (or one GPU)
    python train_ddp.py --config configs/default.yaml train.epochs=3 optim.lr=1e-3
    torchrun --standalone --nproc_per_node=8 train_ddp.py            # one node, 8 GPUs (or CPU procs)
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d \\
        --rdzv-endpoint=HOST:29500 --rdzv-id=JOB train_ddp.py        # run on each of 2 nodes
    sbatch slurm/multinode_torchrun.sbatch                           # SLURM (see slurm/)

The global batch (train.batch_size) is split evenly over the ranks, so results
do not depend on how many processes share the work.  Outputs go to run.dir (see
cnn/rundir.py): config.yaml, metrics.jsonl, summary.json, predictions.pt,
checkpoints/, profile/ (train.profile_steps), and W&B's wandb_run_id.txt and
wandb/.  Exit codes: 0 done, 1 error, 2 bad configuration, 130 stopped by Ctrl-C /
143 by SIGTERM after a checkpoint (re-run with the same run.dir to resume); a second
Ctrl-C exits 130 at once.
"""

from __future__ import annotations

import faulthandler
import functools
import signal

import torch
import torch.distributed as dist
import torch.nn.functional as F

from cnn import checkpoint, config, console, distributed, export, fault, optim, perf, precision, rundir
from cnn.config import Config, ConfigError
from cnn.evaluate import evaluate
from cnn.model import CNN
from cnn.optim import build_optimizer, set_lr
from cnn.profile import make_profiler
from cnn.progress import Progress
from cnn.rundir import RunDir, record
from cnn.tracking import job_facts, make_tracker
from data import mnist
from data.sharding import (DeviceDataset, batch_indices, epoch_indices, seed_step, step_seed, steps_per_epoch,
                           to_device)

STOP_CHECK_EVERY = 10  # steps between the (host-only) collectives that agree on a SIGTERM / Ctrl-C stop


def train(cfg: Config, d: distributed.Dist, stop: distributed.StopRequest) -> int:
    threads = distributed.set_cpu_threads(cfg.train.threads, d)
    heap = perf.keep_heap(cfg.train.keep_heap)  # before the data and the model: then what ran first decides nothing
    if d.device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: pick the fastest conv kernels once
    run = RunDir(distributed.broadcast_object(str(rundir.resolve(cfg.run.dir))))
    if error := distributed.on_rank0(run.create, d.is_main):  # every rank stops at once, with rank 0's reason
        raise rundir.RunDirError(error)
    out = console.make_console(d.is_main)
    out.info(f"world size {d.world_size} ({d.launcher}, {d.num_nodes} node(s)), backend {d.backend}, device {d.device}, "
             f"{threads}; {heap}")

    # ---- data: fetched once per node, resident on the device, normalized once
    error = distributed.once_per_node(
        lambda: mnist.ensure(cfg.data.root, cfg.data.download, log=lambda m: console.say(f"[node {d.node_rank}] {m}")),
        d.local_rank, cfg.dist.data_timeout_s)
    if error:
        raise mnist.DataError(error)
    train_set = DeviceDataset.from_uint8(*mnist.load(cfg.data.root, True, cfg.data.train_subset), d.device,
                                         cfg.train.channels_last)
    test_x, test_y = mnist.load(cfg.data.root, False, cfg.data.test_subset)  # uint8 kept for the prediction figures
    test_set = DeviceDataset.from_uint8(test_x, test_y, d.device, cfg.train.channels_last)
    global_batch, per_rank = cfg.train.batch_size, cfg.train.batch_size // d.world_size
    spe = steps_per_epoch(len(train_set), global_batch)
    total_steps = int(cfg.train.epochs * spe)
    total_steps = min(total_steps, cfg.train.max_steps or total_steps)
    if total_steps < 1:
        raise ConfigError(f"train.epochs: {cfg.train.epochs} of {spe} steps per epoch is not one optimizer step")

    # ---- model, optimizer, precision; `raw` is what evaluation and checkpoints use
    torch.manual_seed(cfg.seed)
    raw = CNN(cfg.model.dropout).to(d.device)
    if cfg.train.channels_last:
        raw = raw.to(memory_format=torch.channels_last)
    opt = build_optimizer(raw, cfg.optim, cfg.train.muon_cuda_graph)
    config_dict = config.to_dict(cfg)
    state = checkpoint.resume(cfg.checkpoint.resume, config_dict, run.path, d.is_main, out.warn)
    prec = precision.choose(cfg.precision, d.device, raw, train_set.images[:per_rank], train_set.labels[:per_rank],
                            cfg.train.precision_probe, resumed=checkpoint.recorded_precision(state))  # auto: the run's
    progress, start_step = Progress.from_checkpoint(state), 0
    if state is not None:
        for note in checkpoint.restore(state, raw, opt, prec.scaler):
            out.info(f"resume: {note}")
        start_step = state["step"]
        out.info(f"resumed from step {start_step} (epoch {state['epoch']}, step {state['step_in_epoch']} of it), "
                 f"saved at world size {state.get('world_size')}")
    ddp = distributed.wrap(raw, d.device, train_set.images[:per_rank], prec.autocast)  # buckets in their final layout
    model = torch.compile(ddp, mode=cfg.train.compile_mode) if cfg.train.compile else ddp
    run_eval = functools.partial(evaluate, raw, test_set, d.rank, d.world_size, cfg.train.eval_batch_size, prec.autocast)

    # ---- outputs: config, metrics and W&B on rank 0; no-op objects elsewhere
    peak = perf.job_roofline(d.device, prec.name, cfg.train.roofline)
    facts = job_facts(d, prec, global_batch, peak, spe, total_steps)
    replays = perf.graph_replays(cfg.train.compile, cfg.train.compile_mode, d.device)
    out.info(f"run dir {run}\n--- resolved config ---\n{config.to_yaml(cfg)}---\nprecision {prec.name}: {prec.reason}")
    tracker = make_tracker(d.is_main, run, config.to_yaml(cfg), cfg.wandb, {**config_dict, **facts},
                           model_file=functools.partial(export.model_file, run))
    ranks = perf.make_rank_stats(cfg.train.rank_stats, raw, d.device, d.world_size, out.warn,
                                 cfg.train.debug_delay_ms if d.rank == cfg.train.debug_delay_rank else 0.0)
    saving = (run.path, cfg.checkpoint.keep, raw, opt, prec.scaler, config_dict, d.world_size, spe,
              precision.record(cfg.precision, prec))
    saver, emergency = checkpoint.make_saver(d.is_main, *saving), checkpoint.make_emergency_saver(d.backend, *saving)
    watchdog = distributed.make_watchdog(cfg.dist.watchdog, cfg.dist.init_timeout_s, d.rank)  # the first step's allowance
    ops = perf.step_ops(cfg.train.count_ops, start_step)  # train.count_ops: host work of one step
    exit_code, intact = 1, None  # intact: the completed step the live model and optimizer hold (None: not one)
    try:
        tracker.truncate_after(start_step)  # records of an attempt that died after its last checkpoint (or before the first)
        tracker.log(record("start", start_step, start_step // spe, **facts), stream=False)  # in W&B's config

        # ---- the loop
        out.start(total_steps, start_step)
        profiler = make_profiler(cfg.train.profile_steps, total_steps, start_step, run, d.rank, d.device, out, tracker)
        window, share, last_eval, step = perf.Window(d.device), None, None, start_step
        syncs = perf.SyncCheck(cfg.train.sync_debug, d.device)
        intact = step
        while step < total_steps:
            watchdog.beat(step)
            syncs.forbid()  # train.sync_debug: a host-device sync from here to a log point raises
            epoch, s = divmod(step, spe)
            if s == 0 or share is None:
                share = to_device(epoch_indices(len(train_set), d.rank, d.world_size, cfg.seed, epoch), d.device)
            fault.maybe_fault(cfg.checkpoint, d.rank, step)
            idx = batch_indices(share, s, per_rank)
            x, y = train_set.images[idx], train_set.labels[idx]
            set_lr(opt, step, total_steps, cfg.optim)
            seed_step(step_seed(cfg.seed, step, d.rank), d.device)
            with prec.autocast():
                logits = model(x)
                loss = F.cross_entropy(logits, y, label_smoothing=cfg.optim.label_smoothing)
            prec.scaler.scale(loss).backward()
            ranks.after_backward()
            intact = None  # from here to step += 1 the update is being applied
            prec.scaler.step(opt)
            prec.scaler.update()
            opt.zero_grad(set_to_none=True)
            window.add(loss, logits, y)
            step += 1
            intact = step
            out.advance()
            if step == start_step + 1:  # compiled and warm: from here a silent rank is a dead one
                distributed.end_warmup(cfg.dist.timeout_s, d.device, d.cpu_group)
                watchdog.set_timeout(cfg.dist.timeout_s)
            profiler.step(step)
            ops.step(step)

            # what this step boundary does
            epoch_end = step % spe == 0 or step == total_steps
            do_eval = epoch_end or (cfg.train.eval_every > 0 and step % cfg.train.eval_every == 0)
            do_log = do_eval or step % cfg.train.log_every == 0
            do_save = epoch_end or (cfg.checkpoint.every_steps > 0 and step % cfg.checkpoint.every_steps == 0)
            stop_signal = stop.agreed(d.cpu_group) if step % STOP_CHECK_EVERY == 0 and step < total_steps else 0

            if do_log or do_save or stop_signal or cfg.train.record_samples:
                syncs.allow()  # reading metrics back, evaluating, saving
            if cfg.train.record_samples:
                tracker.log(record("samples", step, epoch, samples=fault.samples_digest(idx, d.world_size)), stream=False)
            if do_log:
                train_loss, train_acc, images, seconds = window.close(d.world_size, global_batch)
                progress.add(images, seconds)
                lr, tp = opt.param_groups[0]["lr"], perf.throughput(images, seconds, peak)
                tracker.log(record("train", step, epoch, train_loss=train_loss, train_accuracy=train_acc, lr=lr, **tp,
                                   train_seconds=progress.train_seconds, **ranks.close(seconds, step)))
                if not epoch_end:
                    out.status(f"step {step}/{total_steps} epoch {epoch} loss {train_loss:.4f} acc {train_acc:.4f} "
                               f"lr {lr:.2e} {tp['images_per_sec']:.0f} img/s", loss=f"{train_loss:.4f}", acc=f"{train_acc:.3f}")
            if do_eval:
                watchdog.beat(step, cfg.dist.init_timeout_s)  # all 10,000 test images: slow on a slow CPU
                last_eval = run_eval(keep_predictions=step == total_steps)  # the last is also the final evaluation
                progress.record_eval(last_eval.accuracy)
                progress.log_eval(tracker, out, peak, step, epoch, epoch_end, last_eval, train_loss, train_acc)
            if do_save or stop_signal:
                watchdog.beat(step, cfg.checkpoint.save_timeout_s if stop_signal else None)
                fault.slow_save(cfg.checkpoint, d.rank, step)
                out.info(f"checkpoint {saver.save(step, progress_state(progress, tracker))}")
            if stop_signal:
                distributed.wait_for_rank0(cfg.checkpoint.save_timeout_s, d.cpu_group)  # its checkpoint written
                out.info(f"{signal.Signals(stop_signal).name}: stopped at step {step} with a checkpoint; "
                         f"re-run with run.dir={run} to resume")
                exit_code = 128 + stop_signal  # 130 Ctrl-C, 143 SIGTERM: the shell's convention
                return exit_code
            if do_log:
                window.restart_clock()
        out.close()
        ops.close()  # a run shorter than the counted step
        watchdog.beat(step, cfg.dist.init_timeout_s)  # the final evaluation and outputs

        # ---- final evaluation and summary (a finished run started again evaluates here)
        final = last_eval if last_eval is not None and last_eval.predictions is not None else run_eval(keep_predictions=True)
        report(final, d.world_size, run, tracker, out, (test_x, test_y),
               {**progress.summarize(final, total_steps, spe, peak, d.device), **replays.facts(), **ops.facts(),
                **optim.facts(opt), **facts})
        exit_code = 0
        return exit_code
    except RuntimeError as exc:  # a peer gone: this replica still holds the last completed step
        if intact is not None and distributed.collective_failure(exc):
            watchdog.beat(intact)
            save_emergency(emergency, intact, progress, tracker, run, d.rank)
        raise
    finally:
        ops.close()
        watchdog.stop()
        tracker.finish(exit_code)


def report(final, world_size: int, run: RunDir, tracker, out: console.NullConsole, test_uint8: tuple,
           summary: dict) -> None:
    """The final evaluation's outputs (collective): every rank's predictions gathered in test-set
    order into predictions.pt and W&B's figures, the summary, and the last console line."""
    shards: list = [None] * world_size
    dist.all_gather_object(shards, final.predictions.cpu())  # rank order = test-set order
    tracker.predictions(*test_uint8, torch.cat(shards))
    tracker.summary({**summary, "run_dir": str(run)})
    out.info(f"done: test accuracy {final.accuracy:.4f} ({final.count} images), {summary['images_per_sec']:.0f} "
             f"img/s, {summary['train_seconds']:.1f} s training; {run.file(rundir.SUMMARY)}")


def progress_state(progress: Progress, tracker) -> dict:
    """What a checkpoint holds besides the training objects."""
    return {"progress": progress.state_dict(), "wandb_run_id": tracker.run_id}


def save_emergency(emergency, step: int, progress: Progress, tracker, run: RunDir, rank: int) -> None:
    """After a failed collective: the state of the completed step `step` as a checkpoint, from this
    rank (cnn.checkpoint.Saver.save_emergency), said in one line of its own; never raises."""
    try:
        path = emergency.save_emergency(step, {**progress_state(progress, tracker),
                                               "wandb_run_id": tracker.run_id or run.read_wandb_id()})
    except Exception as exc:  # the collective's error is the one to report
        console.warn(f"rank {rank}: emergency checkpoint of step {step} not written ({exc})")
        return
    if path is not None:
        console.warn(f"rank {rank}: a collective failed; emergency checkpoint of step {step}: {path}")


def main(argv: list[str] | None = None) -> int:
    try:
        launch = distributed.launch_env()  # the one source of rank and world size
    except ValueError as exc:  # e.g. WORLD_SIZE=abc
        console.error(f"launcher environment: {exc}")
        return 2
    stop = distributed.StopRequest(announce=launch.rank == 0)  # before anything slow: Ctrl-C at any time
    try:
        cfg = config.parse_args(argv)  # validated against launch_env()'s world size
    except ConfigError as exc:
        console.error(exc, prefix="config error")
        return 2
    try:
        d = distributed.setup(cfg.device, cfg.dist.init_timeout_s)
    except ValueError as exc:
        console.error(exc)
        return 2
    try:
        return train(cfg, d, stop)
    except ConfigError as exc:  # one that needs the data to tell (every rank sees the same)
        console.error(exc, prefix="config error")
        return 2
    except (mnist.DataError, checkpoint.CheckpointError, rundir.RunDirError, distributed.SideGroupError,
            FloatingPointError) as exc:
        console.error(exc)
        return 1
    except RuntimeError as exc:  # a peer died or hung: one line naming the collective, not a traceback
        message = distributed.collective_failure(exc)
        if message is None:
            raise
        console.error(message)
        return 1
    finally:
        distributed.cleanup()


if __name__ == "__main__":
    faulthandler.enable()  # a native crash (SIGSEGV, SIGABRT) prints every thread's Python stack
    distributed.exit_process(main())
