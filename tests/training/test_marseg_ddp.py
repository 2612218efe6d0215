"""MARSeg stages under DDP: two gloo processes on CPU (torch.multiprocessing.spawn). Every
trainable parameter must get a gradient in every step (DDP fails the next step otherwise)."""

import json
import os
import socket
from pathlib import Path

import torch.multiprocessing as mp

PHANTOM = dict(phantom_shape=[8, 64, 64], phantom_spacing=[3.0, 3.5, 3.5])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, outdir):
    import torch

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank))
    from napari_genseg.training.loop import train

    res = {}
    for stage in (1, 2):  # stage 0 has no parameter outside its forward by construction
        steps = []
        cfg = dict(model="marseg_tiny", stage=stage, data=["phantom:2"], **PHANTOM, batch_size=2, steps=3,
                   device="cpu", seed=0, quiet=True, val_fraction=0.5, threads=1, grid="resize", val_every=1000,
                   augment={"off": True}, out=str(Path(outdir) / f"s{stage}.safetensors"))
        s = train(cfg, on_step=lambda st, l: steps.append(st))
        # the group outlives the run: stage 2 must not rendezvous again on the same MASTER_PORT
        # (a fast rank could reach the master's old store; both ranks then hang in DDP's init)
        res[stage] = {"rank": s["rank"], "world": s["world_size"], "steps": steps,
                      "group_kept": torch.distributed.is_initialized()}
    Path(outdir, f"rank{rank}.json").write_text(json.dumps(res))


def test_marseg_stages_1_and_2_under_ddp(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    for r in (0, 1):
        res = json.loads((tmp_path / f"rank{r}.json").read_text())
        for stage in ("1", "2"):
            assert res[stage]["rank"] == r and res[stage]["world"] == 2 and res[stage]["steps"] == [1, 2, 3]
            assert res[stage]["group_kept"]
    from napari_genseg.models.checkpoints import load_checkpoint

    for stage, module in ((1, "pretrain"), (2, "segmentation")):
        ck = load_checkpoint(tmp_path / f"s{stage}.safetensors")
        assert ck.config.module == module and ck.provenance["world_size"] == 2
