"""Process-group initialisation from the launcher's environment (torchrun, Slurm ``srun``, or a plain process).

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT. Under ``srun`` without torchrun we read
SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID and take the first node of SLURM_NODELIST as master. A plain process
(no launcher) becomes a one-rank group so the same code path (FSDP2, DCP checkpoints) runs everywhere.
"""

from __future__ import annotations

import datetime
import os
import socket
import subprocess
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: global rank, world size, local rank and its torch device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def backend(self) -> str:
        return "nccl" if self.device.type == "cuda" else "gloo"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _slurm_env() -> None:
    """Translate Slurm's variables into torchrun's, for jobs started by ``srun python -m internvl_tune.cli ...``."""
    if "RANK" in os.environ or "SLURM_PROCID" not in os.environ:
        return
    os.environ["RANK"] = os.environ["SLURM_PROCID"]
    os.environ["WORLD_SIZE"] = os.environ["SLURM_NTASKS"]
    os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")
    if "MASTER_ADDR" not in os.environ:
        nodes = os.environ.get("SLURM_NODELIST") or os.environ.get("SLURM_JOB_NODELIST", "127.0.0.1")
        try:  # scontrol expands "node[01-04]" into host names; the first one is the master
            out = subprocess.run(["scontrol", "show", "hostnames", nodes], capture_output=True, text=True, check=True)
            os.environ["MASTER_ADDR"] = out.stdout.split()[0]
        except (OSError, subprocess.CalledProcessError, IndexError):
            os.environ["MASTER_ADDR"] = nodes.split(",")[0]
    os.environ.setdefault("MASTER_PORT", "29500")


def init_distributed(device: str | None = None, timeout_minutes: int = 30, cpu_collectives: bool = False) -> DistInfo:
    """Initialise (once) the default process group and pick this rank's device.

    Args:
        device: "cuda", "cpu" or None (CUDA when available).
        timeout_minutes: collective timeout; long enough for a slow checkpoint save on another rank.
        cpu_collectives: on GPUs, also a gloo backend for CPU tensors (FSDP2 CPU offload: the gradient norm of
            offloaded gradients is all-reduced on the CPU).

    Returns:
        The :class:`DistInfo` of this process.
    """
    _slurm_env()
    launched = "RANK" in os.environ
    # a plain process is a group of one on a fresh private port; the environment is left alone, so processes it
    # starts (tests, nested tools) do not believe they belong to its group
    rank, world_size = (int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])) if launched else (0, 1)
    local_rank = int(os.environ.get("LOCAL_RANK", "0")) if launched else 0
    use_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    info = DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=dev)
    if not dist.is_initialized():
        dist.init_process_group(
            backend="cuda:nccl,cpu:gloo" if use_cuda and cpu_collectives else info.backend,
            init_method=None if launched else f"tcp://127.0.0.1:{_free_port()}",
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(minutes=timeout_minutes),
            device_id=dev if use_cuda else None,
        )
    return info


def shutdown() -> None:
    """Tear down the process group if one is up."""
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    """A barrier that is a no-op without a process group."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
