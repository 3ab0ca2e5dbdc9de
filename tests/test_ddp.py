"""cnn.distributed.wrap: every training step, a process's first included, all-reduces in the same
DDP bucket layout, which is what makes a restart bitwise at world size 3 (test_fault.py)."""

import sys

from conftest import REPO, run

WORKER = REPO / "tests" / "ddp_layout_worker.py"


def test_first_step_reduces_in_the_final_bucket_layout():
    """Three gloo ranks: plain DDP's first backward sums in another order than its later ones (the
    layout is rebuilt once, at the forward after the gradient-ready order is known); after wrap(),
    the first training backward is reduced exactly as a plain DDP's third."""
    proc = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=3", str(WORKER)],
               timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "plain: 1st==3rd False 3rd==4th True; settled 1st==plain 3rd True" in proc.stdout, proc.stdout
