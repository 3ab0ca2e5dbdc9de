"""One line for a collective that timed out or lost a peer, naming the collective and where."""

from __future__ import annotations

import re
import traceback
from pathlib import Path



_TIMEOUT = re.compile(r"Timed out waiting (\d+)\s*ms|Timeout\(ms\)=(\d+)")  # gloo | NCCL's watchdog


_PEER_GONE = re.compile(r"[Cc]onnection (?:closed|reset) by peer|[Bb]roken pipe")


# gloo, when an earlier operation on the same connection timed out (a pulled cable: the pending
# operations of the gradient buckets after the first one's timeout); no duration in it
_PAIR_TIMEOUT = re.compile(r"Application timeout caused pair closure")


# gloo names the other end of a connection it lost (transport/tcp/pair.cc): "Connection closed by
# peer [198.18.0.2]:48278", "Read error [198.18.0.2]:48278: Connection reset by peer"
_PEER_ADDRESS = re.compile(r"\[([0-9A-Fa-f.:]+)\]:(\d+)")


_OP_TYPE = re.compile(r"OpType=(\w+)")  # NCCL names the collective itself


_REPO = Path(__file__).resolve().parents[2]  # the repository: cnn/distributed/failures.py


def collective_failure(exc: BaseException) -> str | None:
    """One line for a collective that timed out or lost a peer (None: not such an error).

    gloo raises a plain RuntimeError ("Timed out waiting 10000ms for recv operation to
    complete", torch 2.11 and 2.14) that does not say which collective; the traceback
    does: the torch.distributed function our code called (all_reduce,
    broadcast_object_list...), or the autograd engine, inside which DDP all-reduces the
    gradients.  (NCCL's watchdog usually ends the process itself, with its own message.)
    When gloo lost a connection its text names the other end ("Connection closed by peer
    [198.18.0.2]:48278"): the line names it too; a timeout names no peer.
    """
    msg = str(exc)
    timed_out, gone, pair = _TIMEOUT.search(msg), _PEER_GONE.search(msg), _PAIR_TIMEOUT.search(msg)
    if not (isinstance(exc, RuntimeError) and (timed_out or gone or pair)):
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
    if pair and not gone:
        return (f"{what} timed out{where} (gloo closed the connection after a timeout): another rank died or "
                f"hung (its log says which; dist.timeout_s sets the limit)")
    how = gone.group(0)
    if peer := _PEER_ADDRESS.search(msg):  # the other end: its host, and the rank's port there
        ip, port = peer.groups()
        how += f"{'' if how.endswith('peer') else ', peer'} {f'[{ip}]' if ':' in ip else ip}:{port}"
    return f"{what} failed{where}: another rank is gone ({how}); its log says why"
