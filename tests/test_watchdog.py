"""cnn.distributed.watchdog in a child process: a rank without a step boundary for its timeout
prints every thread's stack and exits by itself, also when its hang holds the GIL; one that keeps
beating lives. (The trainer under torchrun: test_fault.py's hung-rank test; under srun: test_slurm.py.)"""

import re
import subprocess
import sys
import textwrap
import time

from conftest import REPO, child_env

PRELUDE = f"""
import ctypes, sys, time
sys.path.insert(0, {str(REPO)!r})
from cnn.distributed.watchdog import Watchdog
dog = Watchdog(timeout_s=1.0, rank=3, poll_s=0.2, grace_s=0.5)
for step in range(5):
    time.sleep(0.1)
    dog.beat(step)
"""


def _child(body: str, timeout: float = 30) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", PRELUDE + textwrap.dedent(body)], env=child_env(),
                          capture_output=True, text=True, timeout=timeout)
    return proc, time.monotonic() - t0


def test_a_hung_rank_prints_its_stacks_and_exits():
    proc, seconds = _child("""
        def stuck_in_a_collective():
            time.sleep(60)
        stuck_in_a_collective()
    """)
    assert proc.returncode == 1, proc.stderr
    assert seconds < 10, seconds  # 1 s timeout + 0.5 s grace after the last beat, polled every 0.2 s
    lines = proc.stderr.splitlines()
    assert re.match(r"rank 3: no progress for \d s \(after step 4; dist.timeout_s 1 \+ 0.5 s\): this rank is hung",
                    lines[0]), lines[0]
    assert any(line.strip().startswith('File "<string>", line') and line.endswith("in stuck_in_a_collective")
               for line in lines), proc.stderr  # the main thread's stack, where it hangs
    assert lines[-1] == "rank 3: watchdog exit"


def test_a_hang_that_holds_the_gil_is_ended_by_faulthandler():
    """libc's sleep called through ctypes.PyDLL keeps the GIL: the watchdog's Python thread never
    runs again, and faulthandler's C thread (armed from it) dumps the stacks and exits."""
    proc, seconds = _child("""
        def stuck_holding_the_gil():
            ctypes.PyDLL(None).sleep(60)
        stuck_holding_the_gil()
    """)
    assert proc.returncode == 1, proc.stderr
    assert seconds < 10, seconds
    assert proc.stderr.startswith("Timeout ("), proc.stderr  # faulthandler's header, not the Python thread's line
    assert "in stuck_holding_the_gil" in proc.stderr


def test_a_rank_that_keeps_stepping_lives_and_a_stopped_watchdog_never_fires():
    proc, seconds = _child("""
        for step in range(5, 30):
            time.sleep(0.1)  # 2.5 s in all, each step well inside the 1.5 s deadline
            dog.beat(step)
        dog.beat(30, allowance_s=5)  # slow work announced: a save, the final evaluation
        time.sleep(2)
        dog.stop()
        time.sleep(2.5)  # past every deadline, the C-level one included
        print("done")
    """)
    assert proc.returncode == 0 and proc.stdout == "done\n", proc.stderr
    assert proc.stderr == ""


def test_the_watchdog_works_where_sys_stderr_is_not_a_file():
    """A notebook's or pytest's sys.stderr has no file descriptor: faulthandler, given it, raised on
    the watchdog's thread at its first arming, and the hung process slept on."""
    code = textwrap.dedent(f"""
        import io, sys, time
        sys.path.insert(0, {str(REPO)!r})
        sys.stderr = io.StringIO()
        from cnn.distributed.watchdog import Watchdog
        dog = Watchdog(timeout_s=1.0, rank=3, poll_s=0.2, grace_s=0.5)
        dog.beat(0)
        time.sleep(10)
        print("slept through")
    """)
    proc = subprocess.run([sys.executable, "-c", code], env=child_env(), capture_output=True, text=True, timeout=30)
    assert proc.returncode == 1 and "slept through" not in proc.stdout, (proc.returncode, proc.stderr)
    assert "rank 3: no progress" in proc.stderr and "rank 3: watchdog exit" in proc.stderr
