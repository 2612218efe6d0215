"""Every collective of the training loop uses tensors on the device its backend serves.

No GPU is needed: a recording stand-in for ``torch.distributed`` checks each collective's tensor
against the backend the group was started with (NCCL moves CUDA tensors only, gloo CPU ones here),
and a ``TorchFunctionMode`` creates tensors asked for on CUDA on the CPU while remembering the
device that was asked for (what the tensor would be on a GPU node).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode

from napari_genseg.training.distributed import Dist, training_device
from napari_genseg.training.resume import capture_rng

#: the tensor devices each backend accepts
SERVES = {"nccl": {"cuda"}, "gloo": {"cpu"}}


class CudaOnCpu(TorchFunctionMode):
    """Tensors asked for on a CUDA device are made on the CPU; ``asked[id(t)]`` keeps the device."""

    def __init__(self):
        super().__init__()
        self.asked: dict[int, torch.device] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        dev = kwargs.get("device")
        if dev is not None and torch.device(dev).type == "cuda":
            kwargs["device"] = "cpu"
            out = func(*args, **kwargs)
            self.asked[id(out)] = torch.device(dev)
            return out
        if func in (torch.Tensor.to, torch.Tensor.cuda) and any(
                isinstance(a, (str, torch.device)) and torch.device(a).type == "cuda" for a in args[1:]):
            out = args[0].clone()
            self.asked[id(out)] = next(torch.device(a) for a in args[1:] if isinstance(a, (str, torch.device)))
            return out
        return func(*args, **kwargs)

    def device_of(self, t: torch.Tensor) -> torch.device:
        return self.asked.get(id(t), t.device)


class FakeDist:
    """Records the group's backend and every collective; fails on a tensor the backend cannot move."""

    def __init__(self, mode: CudaOnCpu, world: int = 2, rank: int = 0):
        self.mode, self.world, self.rank = mode, world, rank
        self.backend = None
        self.calls: list[tuple] = []

    def install(self, monkeypatch):
        for name in ("is_initialized", "init_process_group", "get_world_size", "get_rank", "broadcast",
                     "all_reduce", "barrier", "all_gather_object", "destroy_process_group"):
            monkeypatch.setattr(dist, name, getattr(self, name))

    def is_initialized(self):
        return self.backend is not None

    def init_process_group(self, backend, **kw):
        self.backend = backend
        self.calls.append(("init", backend, kw.get("device_id")))

    def get_world_size(self):
        return self.world

    def get_rank(self):
        return self.rank

    def _check(self, op, t):
        dev = self.mode.device_of(t)
        assert dev.type in SERVES[self.backend], f"{op}: a {dev} tensor on a {self.backend} group"
        self.calls.append((op, str(dev)))

    def broadcast(self, t, src=0, **kw):
        self._check("broadcast", t)

    def all_reduce(self, t, **kw):
        self._check("all_reduce", t)

    def barrier(self, device_ids=None, **kw):
        self.calls.append(("barrier", device_ids))

    def all_gather_object(self, out, obj, **kw):
        out[:] = [obj] * self.world
        self.calls.append(("all_gather_object",))

    def destroy_process_group(self):
        self.calls.append(("destroy",))


@pytest.mark.parametrize("asked, backend, device, current, barrier_ids", [
    ("cuda", "nccl", "cuda:1", [torch.device("cuda", 1)], [1]),  # NCCL: the GPU is current and named
    ("cpu", "gloo", "cpu", [], None),
])
def test_collectives_use_the_training_device(monkeypatch, asked, backend, device, current, barrier_ids):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "1")
    made_current = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: made_current.append(torch.device(d)))
    with CudaOnCpu() as mode:
        fake = FakeDist(mode)
        fake.install(monkeypatch)
        dev = training_device(asked)  # what the loop runs on under torchrun
        d = Dist.from_env(dev)
        assert (fake.backend, str(dev), d.world, d.rank) == (backend, device, 2, 0)
        assert d.rank0_decision(0.25, True) == (0.25, True)
        assert len(d.gather_objects(capture_rng(torch.device("cpu")))) == 2
        d.close()
        assert ("destroy",) not in fake.calls  # the group outlives a run (the next run reuses it)
        from napari_genseg.training import distributed

        distributed._leave_group()  # what atexit runs
    assert fake.calls == [("init", backend, current[0] if current else None), ("broadcast", device),
                          ("all_gather_object",), ("barrier", barrier_ids), ("destroy",)]
    assert made_current == current


def test_single_process_needs_no_group(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    d = Dist.from_env(torch.device("cpu"))
    assert (d.world, d.rank, d.main) == (1, 0, True)
    assert d.rank0_decision(0.5, False) == (0.5, False)
    assert d.gather_objects("x") == ["x"]
