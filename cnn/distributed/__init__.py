"""Distributed state, one idea a module: which launcher started this process and what it gave it
(launch), the process group and its timeouts (group), the SIGTERM / Ctrl-C stop agreed at step
boundaries (stop), the DDP wrapper with its buckets settled (ddp), a hung rank's own end (watchdog), and one-line messages for failed collectives (failures).

``setup()`` detects the launcher (torchrun's variables, or SLURM's when ``srun`` starts one task per
GPU directly), sets the device *before* ``init_process_group`` and returns an immutable ``Dist``.  A
plain ``python train_ddp.py`` is world size 1 of the same code: a one-process group on an in-memory
store, so DDP and the collectives run unchanged.  ``cleanup()`` is always safe to call.
"""

import torch.distributed as dist  # noqa: F401  (tests patch distributed.dist)

from cnn.distributed.launch import first_slurm_host, slurm_port, Launch, tasks_per_node, launch_env, choose_gpu, pick_device, cpu_threads  # noqa: F401
from cnn.distributed.group import Dist, set_cpu_threads, setup, set_timeout, end_warmup, wait_for_rank0, cleanup, exit_process, once_per_node, SideGroupError, side_group_error, agree_error, on_rank0, broadcast_object  # noqa: F401
from cnn.distributed.stop import StopRequest  # noqa: F401
from cnn.distributed.ddp import wrap, settle_buckets  # noqa: F401
from cnn.distributed.watchdog import Watchdog, NullWatchdog, make_watchdog  # noqa: F401
from cnn.distributed.failures import collective_failure  # noqa: F401
