"""Fault tolerance with real launches: SIGKILL + elastic restart (bitwise), a hung rank and
resume at another world size, checkpoint fallbacks and adaptations (Ctrl-C / SIGTERM:
test_interrupt.py)."""

import os
import random
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from cnn import checkpoint
from cnn.rundir import read_metrics, read_summary
from conftest import REPO, assert_ranks_ok, child_env, ranks, run, smoke_args, torchrun

# 2 epochs of 30 steps (1920 images, global batch 64); checkpoints and logs every 10 steps.
# The LR is pinned so that these runs do not move with the default recipe: the cross-world-size
# tolerance below was measured at 2e-3 (a larger step amplifies reduction-order noise).
SMALL = ("data.train_subset=1920", "train.batch_size=64", "train.epochs=2", "train.log_every=10",
         "checkpoint.every_steps=10", "checkpoint.keep=10", "train.record_samples=true", "precision=fp32",
         "optim.lr=2e-3", "model.dropout=0.2")  # dropout on: its masks must resume exactly too
STEPS = 60


def _final_weights(run_dir):
    return checkpoint.load(checkpoint.list_checkpoints(run_dir)[0])["model"]


def _samples(run_dir):
    return [(r["step"], r["samples"]) for r in read_metrics(run_dir, "samples")]


def _train_records(run_dir):
    return [(r["step"], r["train_loss"], r.get("test_accuracy")) for r in read_metrics(run_dir, "train", "epoch")]


def _assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _python(root, run_dir, *args):
    """A one-process launch (no torchrun agent: faster where the launcher is not the point)."""
    return run([sys.executable, "train_ddp.py", *smoke_args(root, run_dir, *args)])


@pytest.fixture(scope="module")
def reference(mnist_root, tmp_path_factory):
    """An uninterrupted 2-rank run of SMALL (ranks wired by environment variables, no torchrun
    agent: the same processes, data and collectives)."""
    run_dir = tmp_path_factory.mktemp("reference")
    assert_ranks_ok(ranks(2, *smoke_args(mnist_root, run_dir, *SMALL)))
    return run_dir


@pytest.fixture(scope="module")
def reference3(mnist_root, tmp_path_factory):
    """SMALL at world size 3, global batch 96 (32 a rank): 20 steps an epoch, 40 in all."""
    run_dir = tmp_path_factory.mktemp("reference3")
    assert_ranks_ok(ranks(3, *smoke_args(mnist_root, run_dir, *SMALL, "train.batch_size=96")))
    return run_dir


@pytest.mark.parametrize("world_size", [2, 3])
def test_sigkill_at_a_random_step_costs_only_the_step_in_flight(mnist_root, reference, reference3, tmp_path,
                                                                 world_size):
    """No periodic checkpoints (checkpoint.every_steps=0: only epoch ends), and the last rank
    SIGKILLs itself before a random step k under torchrun --max-restarts=1. The survivors' next
    collective (DDP's gradient all-reduce of step k+1) fails; they hold step k complete and write
    it (emergency checkpoint), and the restarted job resumes from step k -- not from the epoch
    start -- with the same samples, and ends bitwise equal to the uninterrupted run (CPU fp32).
    At world size 3 that needs the restarted process's first step to all-reduce in the same
    bucket layout as every other step (cnn.distributed.ddp.settle_buckets): gloo's 3-rank ring
    sum depends on each element's offset in the bucket (without it: 8.7e-4 relative)."""
    ref, more, steps = (reference, (), STEPS) if world_size == 2 else (reference3, ("train.batch_size=96",), 40)
    k = random.Random().randrange(2, steps - 1)
    victim = world_size - 1
    proc = run(torchrun(world_size, *smoke_args(mnist_root, tmp_path, *SMALL, *more, "checkpoint.every_steps=0",
                                                f"checkpoint.fault_step={k}", f"checkpoint.fault_rank={victim}"),
                        extra=("--max-restarts=1",)))
    assert proc.returncode == 0, (k, proc.stderr[-3000:])
    assert f"fault injection: rank {victim} kills at step {k}" in proc.stderr
    spe = steps // 2
    # written unless the epoch's own checkpoint of step k exists already (never twice, never older)
    assert (f"emergency checkpoint of step {k}:" in proc.stderr) == (k % spe != 0), (k, proc.stderr[-3000:])
    assert f"rank {victim}: a collective failed" not in proc.stderr  # the dead rank wrote nothing
    assert f"resumed from step {k} (epoch {k // spe}, step {k % spe} of it)" in proc.stdout, (k, proc.stdout[-2000:])
    _assert_same_weights(_final_weights(ref), _final_weights(tmp_path))
    samples = _samples(tmp_path)
    assert [s for s, _ in samples] == list(range(1, steps + 1)), "a step lost or repeated"
    assert samples == _samples(ref)
    # the same records, but the train loss of the first log window after k when k is inside one: the
    # restarted process averages the window's steps since k only (train.log_every=10)
    partial = (k // 10 + 1) * 10 if k % 10 else None
    assert [r if r[0] != partial else (r[0], r[2]) for r in _train_records(ref)] == \
        [r if r[0] != partial else (r[0], r[2]) for r in _train_records(tmp_path)]


def _timed_run(cmd, marker: str, timeout: float):
    """Run cmd; returns (proc, stdout, stderr, seconds from the stderr line holding `marker`
    to the launcher's exit, or None if it never appeared)."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines, seen = [], []

    def read_stderr():
        for line in proc.stderr:
            lines.append(line)
            if marker in line and not seen:
                seen.append(time.monotonic())

    reader = threading.Thread(target=read_stderr)
    reader.start()
    out = proc.stdout.read()
    proc.wait(timeout=timeout)
    end = time.monotonic()
    reader.join()
    return proc, out, "".join(lines), (end - seen[0]) if seen else None


def _processes_mentioning(text: str) -> list[int]:
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if text.encode() in cmdline.read_bytes():
                pids.append(int(cmdline.parent.name))
        except OSError:
            pass
    return pids


TIMEOUT_S = 5
# The hung rank's own watchdog (cnn.distributed.watchdog) ends it dist.timeout_s + GRACE_S (5 s) after
# its last step boundary, polled every second; then process exit. Without it torchrun SIGKILLs it
# 30 s after the first worker failed (torch 2.14 LocalElasticAgent._stop_workers -> _shutdown(30)).
HANG_MARGIN_S = 10


def test_hung_rank_ends_the_job_within_the_timeout_then_resume_at_another_world_size(mnist_root, tmp_path):
    """Rank 1 stops stepping at step 15 without exiting. Rank 0's next collective (DDP's
    gradient all-reduce) times out after dist.timeout_s and says so in one line; the hung rank's
    watchdog prints its stacks (where it hangs) and ends it within dist.timeout_s + 10 s of the
    hang; no process survives. The run then resumes at world size 1
    from the emergency checkpoint rank 0 wrote of step 15, with the same global sample sequence.

    Weights agree to float32 reduction-order noise only: the two ranks' gradients
    are summed by all-reduce at world size 2 and inside one batch at world size 1.
    Dropout is off here because its masks are drawn per rank."""
    # the tolerance below was measured for Adam alone without label smoothing (Muon's
    # orthogonalization would pass the reduction-order noise on at another scale)
    args = (*SMALL, "model.dropout=0", "optim.muon_lr=0", "optim.label_smoothing=0")
    ref = tmp_path / "ref"  # uninterrupted, at world size 2
    assert_ranks_ok(ranks(2, *smoke_args(mnist_root, ref, *args)))
    cut = tmp_path / "cut"
    proc, out, err, seconds = _timed_run(
        torchrun(2, *smoke_args(mnist_root, cut, *args, "checkpoint.fault_step=15", "checkpoint.fault_rank=1",
                                "checkpoint.fault_kind=hang", f"dist.timeout_s={TIMEOUT_S}")),
        "fault injection: rank 1 hangs at step 15", timeout=300)
    assert proc.returncode != 0 and seconds is not None, err[-3000:]
    print(f"hang -> last process exit: {seconds:.1f} s (dist.timeout_s={TIMEOUT_S})")
    assert TIMEOUT_S <= seconds < TIMEOUT_S + HANG_MARGIN_S
    assert not _processes_mentioning(str(cut)), "a rank outlived the launcher"
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err[-3000:]
    assert re.fullmatch(rf"error: collective DDP gradient all-reduce \(in backward\) timed out after {TIMEOUT_S} s "
                        r"at train_ddp\.py:\d+: another rank died or hung .*", errors[0]), errors[0]
    watchdog = re.search(r"rank 1: no progress for \d+ s \(after step 15; .*?\nrank 1: watchdog exit\n", err, re.S)
    assert watchdog, err[-3000:]
    assert re.search(r'File ".*cnn/fault\.py", line \d+ in maybe_fault', watchdog.group(0)), watchdog.group(0)
    rest = err.replace(watchdog.group(0), "")
    assert 'train_ddp.py", line' not in rest, "a worker printed a traceback"  # torchrun's own is allowed
    second = _python(mnist_root, cut, *args)
    assert second.returncode == 0, second.stderr[-3000:]
    # rank 0 held step 15 complete when its all-reduce of step 16 timed out: it saved that step
    assert "rank 0: a collective failed; emergency checkpoint of step 15" in err
    assert "resumed from step 15" in second.stdout and "saved at world size 2" in second.stdout
    assert _samples(cut) == _samples(ref)
    # Summed in another order, the gradients differ in their last bits (~1e-6 relative, on every CPU
    # kind); how far training then carries that apart depends on the kernels: after 10 steps 2.6e-4
    # with torch's AVX-512 kernels, 9e-8 with its AVX2 ones (ATEN_CPU_CAPABILITY=avx2, same AVX-512
    # EPYC); after 50, 1.4e-2 and 3e-7. A resume that lost the optimizer state (fresh Adam moments)
    # is 0.72 and 0.81 apart: the bounds below tell the two apart on any CPU, and the accuracy is the same.
    for step, bound in ((20, 1e-2), (STEPS, 1e-1)):
        a, b = (checkpoint.load(checkpoint.path_for(d, step))["model"] for d in (ref, cut))
        for k in a:
            rel = ((a[k] - b[k]).norm() / a[k].norm()).item()
            assert rel < bound, (step, k, rel)
    assert abs(read_summary(cut)["test_accuracy"] - read_summary(ref)["test_accuracy"]) <= 0.01
    s = read_summary(cut)
    assert s["world_size"] == 1 and s["steps"] == STEPS


def test_resume_refuses_a_changed_config(mnist_root, reference, tmp_path):
    shutil.copytree(reference / "checkpoints", tmp_path / "checkpoints")
    proc = _python(mnist_root, tmp_path, *SMALL, "optim.lr=0.01")  # the later override wins
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: {tmp_path}: optim.lr was 0.002 when saved but is 0.01 now: pass optim.lr=0.002 to continue this "
        "run, or pass another run.dir to start a new run")


def test_truncated_newest_checkpoint_falls_back(mnist_root, reference, tmp_path):
    shutil.copytree(reference / "checkpoints", tmp_path / "checkpoints")
    paths = checkpoint.list_checkpoints(tmp_path)
    paths[0].write_bytes(paths[0].read_bytes()[:1000])  # step 60 truncated -> falls back to 50
    proc = _python(mnist_root, tmp_path, *SMALL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"skipping {paths[0]}" in proc.stderr and "resumed from step 50" in proc.stdout
    # an explicit bad path is an error naming it, not a fallback
    paths[1].write_bytes(b"junk")
    proc = _python(mnist_root, tmp_path / "y", *SMALL, f"checkpoint.resume={paths[1]}")
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: {paths[1]}")


def test_resume_adapts_to_a_changed_precision_and_memory_format(mnist_root, reference, tmp_path):
    """A checkpoint saved in fp32 + channels_last continues in fp16 + contiguous: a fresh loss
    scaler (its saved state is empty) and the optimizer state in the new layout (fused Adam
    would crash on CUDA, and silently mis-pair elements on CPU)."""
    # 2 steps and 200 test images: fp16 autocast on a CPU without native fp16 trains ~60 images/s,
    # and 2 Adam steps (the scaler's and the optimizer's) use the converted state as surely as 30
    step50 = checkpoint.path_for(reference, 50)
    proc = _python(mnist_root, tmp_path, *SMALL, "precision=fp16", "train.channels_last=false",
                   f"checkpoint.resume={step50}", "train.max_steps=52", "data.test_subset=200")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from step 50" in proc.stdout
    assert "resume: fp16 loss scaler starts fresh" in proc.stdout
    assert "resume: optimizer state converted to the model's memory format" in proc.stdout
    s = read_summary(tmp_path)
    assert s["precision"] == "fp16" and s["steps"] == 52 and s["test_accuracy"] > 0.8
    # the fp16 steps moved the weights, from where the checkpoint left them, without NaNs
    before, after = checkpoint.load(step50)["model"], _final_weights(tmp_path)
    assert all(torch.isfinite(after[k]).all() for k in after) and any(not torch.equal(before[k], after[k]) for k in after)


def test_explicit_checkpoint_needs_to_exist_on_rank_0_only(mnist_root, reference, tmp_path):
    """Nodes need not share a filesystem: rank 1 is given a path it cannot see (checked where
    it is read, on rank 0, whose broadcast carries the state), and the run resumes."""
    newest = checkpoint.list_checkpoints(reference)[0]
    procs = ranks(2, *smoke_args(mnist_root, tmp_path, *SMALL), rank_args=lambda r: (
        f"checkpoint.resume={newest if r == 0 else '/not/on/this/node.pt'}",))
    assert_ranks_ok(procs)
    assert f"resumed from step {STEPS}" in procs[0].stdout
    assert read_summary(tmp_path)["world_size"] == 2


def test_a_worker_dies_with_its_torchrun_agent(mnist_root, tmp_path):
    """torchrun starts its worker in a session of its own: SIGKILL of the agent alone (an OOM kill)
    left the worker training, and an elastic job's other agents then waited 300 s at torchrun's
    exit barrier. The worker now dies with its agent (cnn.distributed.group.die_with_agent)."""
    agent = subprocess.Popen(torchrun(1, *smoke_args(mnist_root, tmp_path, "train.epochs=5")), cwd=REPO,
                             env=child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not (tmp_path / "metrics.jsonl").exists():
            time.sleep(0.2)
        workers = [p for p in _processes_mentioning(str(tmp_path)) if p != agent.pid]
        assert workers, "no worker started"
        agent.kill()
        agent.wait(timeout=10)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(Path(f"/proc/{p}").exists() and not _zombie(p) for p in workers):
            time.sleep(0.1)
        assert not [p for p in workers if Path(f"/proc/{p}").exists() and not _zombie(p)], "the worker outlived its agent"
    finally:
        agent.kill()
        for p in _processes_mentioning(str(tmp_path)):
            try:
                os.kill(p, 9)
            except OSError:
                pass


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"
    except OSError:
        return False
