"""Two gloo processes on CPU (torch.multiprocessing.spawn) run the same training."""

import json
import os
import socket
import sys
from pathlib import Path

import pytest
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, cfg, outdir):
    sys.path.insert(0, str(Path(__file__).parent))
    import torch

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank))
    from _tinynet import register

    register()
    from napari_genseg.training.loop import train

    steps = []
    s = train(cfg, on_step=lambda st, l: steps.append(st))
    Path(outdir, f"rank{rank}.json").write_text(json.dumps({"rank": s["rank"], "world": s["world_size"],
                                                            "steps": steps}))


def test_ddp_two_processes_gloo(tiny_cfg, tmp_path):
    ckdir = tmp_path / "ck"
    cfg = tiny_cfg(steps=4, out=str(ckdir / "ddp.safetensors"), threads=1)
    mp.spawn(_worker, args=(2, _free_port(), cfg, str(tmp_path)), nprocs=2, join=True)
    r0 = json.loads((tmp_path / "rank0.json").read_text())
    r1 = json.loads((tmp_path / "rank1.json").read_text())
    assert {r0["rank"], r1["rank"]} == {0, 1} and r0["world"] == r1["world"] == 2
    assert r0["steps"] == r1["steps"] == [1, 2, 3, 4]
    files = sorted(p.name for p in ckdir.iterdir())
    assert files == ["ddp.json", "ddp.safetensors", "ddp.train.pt"]
    from napari_genseg.models.checkpoints import load_checkpoint

    assert load_checkpoint(ckdir / "ddp.safetensors").provenance["world_size"] == 2
