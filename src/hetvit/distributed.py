"""The processes of a multi-process (DDP) run: who this process is, and what a run may ask for.

Lightning starts the processes itself (its launcher runs the command again once for each
further device of a machine), or reads them from the environment ``torchrun`` and SLURM's
``srun`` set up. Either way, everything a command does before ``trainer.fit`` runs in every
process: checks, compression, calibration. So a run asks :func:`is_writer` before it writes
anything, and only the first process of the first machine does (its settings record, lock,
``epochs.log``, plots and ``model/``; Lightning's checkpoints and CSV logs are rank-0 only
already).

:func:`check_processes` refuses, in one line and before any process starts, what would
otherwise hang or fail deep inside torch: more devices than the machine has, a batch that
cannot be split over the processes, a torch without the distributed backend.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from .errors import TrainingError

__all__ = ["STRATEGIES", "Processes", "check_processes", "is_writer", "shard", "cpu_cores",
           "uses_gpu"]

STRATEGIES = ("auto", "ddp")
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps")
"""Lightning's accelerators a run may ask for; another (a TPU, say) needs packages hetvit does
not install, and Lightning's own refusal of it is a traceback."""

# The variables a launcher sets to say which process this is: torchrun (RANK), SLURM's srun
# (SLURM_PROCID), Lightning's own launcher and its multi-machine convention (NODE_RANK,
# LOCAL_RANK). In the first process of the first machine each is unset or 0.
_RANK_VARIABLES = ("RANK", "SLURM_PROCID", "NODE_RANK", "LOCAL_RANK")


def cpu_cores() -> int:
    """The cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _in_group() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def is_writer() -> bool:
    """Whether this process writes the run's files: global rank 0.

    Asked of the process group once there is one, and of the launcher's variables before
    (when the checks and the run's settings record happen).
    """
    if _in_group():
        return shard()[0] == 0
    return all(os.environ.get(name, "0") == "0" for name in _RANK_VARIABLES)


def shard() -> tuple[int, int]:
    """``(rank, world size)`` of this process in its process group; ``(0, 1)`` outside one."""
    if _in_group():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


@dataclass(frozen=True)
class Processes:
    """How many processes a run uses and how Lightning connects them.

    ``batch_size`` is the batch of one optimiser step, over all processes: each takes
    ``batch_size // world`` images, so the same command trains the same way on 1 or 8
    devices (DDP averages the processes' gradients). ``threads`` is torch's per process:
    the cores shared out among the processes of a machine.
    """

    devices: int
    num_nodes: int
    strategy: str
    world: int
    per_process_batch: int
    threads: int

    def lightning_strategy(self) -> str:
        return "ddp" if self.world > 1 or self.strategy == "ddp" else "auto"


def uses_gpu(accelerator: str) -> bool:
    """Whether Lightning's ``accelerator`` setting puts this run on a CUDA GPU."""
    return accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())


def check_processes(devices: int = 1, num_nodes: int = 1, strategy: str = "auto",
                    accelerator: str = "auto", batch_size: int | None = None,
                    threads: int | None = None) -> Processes:
    """The run's processes, or a one-line :class:`TrainingError` saying what cannot work.

    ``batch_size`` (over all processes) is checked when given; a run on data loaders (the
    Python API) gives each process the loader's own batch instead.
    """
    for name, value in (("devices", devices), ("num-nodes", num_nodes)):
        if not isinstance(value, int) or value < 1:
            raise TrainingError(f"--{name} must be a whole number >= 1, got {value!r}")
    if strategy not in STRATEGIES:
        raise TrainingError(f"--strategy must be one of {', '.join(STRATEGIES)}, not "
                            f"{strategy!r}")
    if accelerator not in ACCELERATORS:
        raise TrainingError(f"--accelerator must be one of {', '.join(ACCELERATORS)}, not "
                            f"{accelerator!r}")
    world = devices * num_nodes
    gpu = uses_gpu(accelerator)
    cores = cpu_cores()
    if gpu:
        count = torch.cuda.device_count()
        if devices > count:
            raise TrainingError(f"--devices {devices}: this machine has {count} CUDA GPU(s)")
    elif devices > cores:
        raise TrainingError(f"--devices {devices} on the CPU runs one process per device, and "
                            f"this machine gives this process {cores} core(s): use at most "
                            f"{cores}")
    if world > 1 or strategy == "ddp":
        dist = torch.distributed
        if not dist.is_available():
            raise TrainingError("this torch was built without torch.distributed, which DDP "
                                "needs: use --devices 1 --num-nodes 1")
        if not (dist.is_gloo_available() or (gpu and dist.is_nccl_available())):
            needed = "NCCL or gloo" if gpu else "gloo (the CPU backend)"
            raise TrainingError(f"DDP on {'CUDA' if gpu else 'the CPU'} needs the {needed} "
                                "backend, which this torch build lacks: use --devices 1")
    per_process = 0
    if batch_size is not None:
        if batch_size < world:
            raise TrainingError(f"--batch-size {batch_size} is the batch of one step over all "
                                f"{world} processes: it must be at least {world}")
        if batch_size % world:
            raise TrainingError(f"--batch-size {batch_size} does not split evenly over {world} "
                                f"processes: use a multiple of {world}")
        per_process = batch_size // world
    if threads is not None and threads < 1:
        raise TrainingError(f"--threads must be at least 1, got {threads}")
    share = threads or max(1, cores // devices)
    return Processes(devices, num_nodes, strategy, world, per_process, share)
