"""DDP plumbing of the training loop: the process group and the few collectives the loop needs.

Under ``torchrun`` (``WORLD_SIZE > 1``) the group is started from the environment with the backend
of the training device (``backend_for``: NCCL for CUDA, gloo otherwise), and every collective here
uses tensors on that same device: NCCL only moves CUDA tensors, gloo here only CPU ones. (PyTorch:
``torch.distributed`` backends table, https://pytorch.org/docs/stable/distributed.html.)

The loop's decisions that depend on a clock (time budget, ``max_minutes``) are taken by rank 0 and
broadcast, so every rank steps, validates and stops together; only rank 0 validates, prints and
saves. Single-process runs never touch ``torch.distributed``.
"""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass, field

import torch

__all__ = ["Dist", "backend_for", "training_device"]


def backend_for(device: torch.device) -> str:
    """The process-group backend whose collectives accept tensors on ``device``."""
    return "nccl" if device.type == "cuda" else "gloo"


def training_device(name: str) -> torch.device:
    """``device.resolve_device`` for training: ``auto`` never picks MPS (untested for training);
    under ``torchrun`` on CUDA each process takes GPU ``LOCAL_RANK`` (and makes it current)."""
    from ..device import resolve_device

    dev = resolve_device(name)
    if dev.type == "mps" and name == "auto":
        dev = torch.device("cpu")
    if dev.type == "cuda" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(dev)
    return dev


@dataclass
class Dist:
    """This process's place in the run (world size 1 = no process group) and its collectives."""

    world: int = 1
    rank: int = 0
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @classmethod
    def from_env(cls, device: torch.device) -> "Dist":
        """Join the ``torchrun`` group (``WORLD_SIZE``/``RANK``/``LOCAL_RANK``/``MASTER_*``) with the
        backend of ``device``; world size 1 without ``WORLD_SIZE``.

        The group is created once per process and left at process exit (``atexit``), not after
        each run: several runs in one process (the MARSeg stages one after another) then share
        it. Destroying and re-creating it on the same ``MASTER_PORT`` races: a fast rank can
        reach the master's old store before the master has replaced it, and both ranks then
        wait forever in DDP's first collective."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls(device=device)
        import torch.distributed as dist

        if not dist.is_initialized():
            kw = {"device_id": device} if device.type == "cuda" else {}
            dist.init_process_group(backend=backend_for(device), **kw)
            atexit.register(_leave_group)
        return cls(dist.get_world_size(), dist.get_rank(), int(os.environ.get("LOCAL_RANK", "0")), device)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def rank0_decision(self, frac: float, stop: bool) -> tuple[float, bool]:
        """Rank 0's (budget fraction, stop) for every rank: one ``broadcast`` of a float64 tensor
        on the training device."""
        if self.world <= 1:
            return frac, stop
        import torch.distributed as dist

        t = torch.tensor([frac, float(stop)], dtype=torch.float64, device=self.device)
        dist.broadcast(t, src=0)
        frac_, stop_ = t.cpu().tolist()
        return float(frac_), stop_ > 0.5

    def gather_objects(self, obj) -> list:
        """``obj`` of every rank, in rank order (``all_gather_object``; [obj] in a single process)."""
        if self.world <= 1:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        """Wait for every rank (NCCL: on this rank's GPU)."""
        if self.world <= 1:
            return
        import torch.distributed as dist

        if self.device.type == "cuda":
            dist.barrier(device_ids=[self.device.index])
        else:
            dist.barrier()

    def close(self) -> None:
        """Last barrier of a run (the group stays for the next run in this process; see ``from_env``)."""
        if self.world <= 1:
            return
        self.barrier()


def _leave_group() -> None:
    """Leave the process group at exit (registered by ``Dist.from_env``)."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
