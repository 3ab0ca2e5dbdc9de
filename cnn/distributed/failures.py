"""One line for a collective that timed out or lost a peer, naming the collective and where."""

from __future__ import annotations

import re
import traceback
from pathlib import Path



_TIMEOUT = re.compile(r"Timed out waiting (\d+)\s*ms|Timeout\(ms\)=(\d+)")  # gloo | NCCL's watchdog


_PEER_GONE = re.compile(r"[Cc]onnection (?:closed|reset) by peer|[Bb]roken pipe")


_OP_TYPE = re.compile(r"OpType=(\w+)")  # NCCL names the collective itself


_REPO = Path(__file__).resolve().parents[2]  # the repository: cnn/distributed/failures.py


def collective_failure(exc: BaseException) -> str | None:
    """One line for a collective that timed out or lost a peer (None: not such an error).

    gloo raises a plain RuntimeError ("Timed out waiting 10000ms for recv operation to
    complete", torch 2.11 and 2.14) that does not say which collective; the traceback
    does: the torch.distributed function our code called (all_reduce,
    broadcast_object_list...), or the autograd engine, inside which DDP all-reduces the
    gradients.  (NCCL's watchdog usually ends the process itself, with its own message.)
    """
    msg = str(exc)
    timed_out, gone = _TIMEOUT.search(msg), _PEER_GONE.search(msg)
    if not (isinstance(exc, RuntimeError) and (timed_out or gone)):
        return None
    name, where = "", ""
    for frame, lineno in traceback.walk_tb(exc.__traceback__):  # outermost first
        path, func = Path(frame.f_code.co_filename), frame.f_code.co_name
        if "torch" in path.parts:
            if not name and "autograd" in path.parts:
                name = "DDP gradient all-reduce (in backward)"
            elif not name and "distributed" in path.parts and not func.startswith("_") and func != "wrapper":
                name = func  # the public torch.distributed call (not its logging decorator)
        elif path.is_relative_to(_REPO) and "site-packages" not in path.parts:
            where = f" at {path.name}:{lineno}"  # our innermost frame
    op = _OP_TYPE.search(msg)
    what = f"collective {op.group(1).lower() if op else name}" if op or name else "a collective"
    if timed_out:
        ms = next(g for g in timed_out.groups() if g)
        return (f"{what} timed out after {int(ms) / 1000:g} s{where}: another rank died or hung "
                f"(its log says which; dist.timeout_s sets the limit)")
    return f"{what} failed{where}: another rank is gone ({gone.group(0)}); its log says why"
