"""CPU thread count vs throughput, with and without a background load (issue: the CLI ran 4-5x
slower with torch's default thread count than with ``--threads 1`` next to busy processes).

    PYTHONPATH=src .venv/bin/python benchmarks/threads.py [--slices 16] [--load-procs N] [--input CT]

Every configuration runs in a fresh process (thread settings and OMP_WAIT_POLICY take effect at
start): the shipped MSA²Net demo checkpoint over ``--slices`` slices of the real abdomen CT
(or the phantom when ../shared is absent), batch 4, fp32, after a 2-slice warm-up. "loaded" =
``--load-procs`` (default: one per CPU) busy-looping Python processes started by this script and
stopped after each measurement. Configurations are interleaved over ``--repeats`` rounds (so a
shared machine's own load hits them alike) and the table shows medians of slices/s per (threads,
wait policy, load), the slow-down under the added load and the machine's load average. ``threads=default`` is what ``genseg`` does without ``--threads``
(``napari_genseg.threads``: OMP_WAIT_POLICY=PASSIVE set before torch loads, then
``default_threads``).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from napari_genseg.device import cpu_model_name

REPO = Path(__file__).resolve().parents[1]
CT = REPO.parent / "shared" / "data" / "real" / "ct-abdomen" / "ct_abdomen_small.nii.gz"


def _spin(stop) -> None:
    x = 0
    while not stop.is_set():
        for _ in range(100_000):
            x += 1


def child(args) -> None:
    from napari_genseg.threads import configure_threads, prefer_passive_wait

    if args.threads == "default":
        prefer_passive_wait()  # what `genseg` does before torch loads
    import torch

    n = configure_threads(None if args.threads == "default" else int(args.threads))
    from napari_genseg.engine import make_predictor, run_to_end, run_volume
    from napari_genseg.models.checkpoints import resolve_model

    if args.input:
        from napari_genseg.io import load_volume

        vol = load_volume(args.input)
    else:
        import numpy as np

        from napari_genseg.io.nifti import volume_from_array
        from napari_genseg.phantom import make_phantom

        ph = make_phantom(seed=0)
        vol = volume_from_array(np.transpose(ph.image, (2, 1, 0)), ph.affine)
    ckpt = resolve_model("msa2net")
    pred = make_predictor(ckpt, device="cpu", precision="fp32")
    run_to_end(run_volume(pred, vol, slices=(0, 2), batch_size=2))
    pred = make_predictor(ckpt, device="cpu", precision="fp32")
    zs = (0, min(args.slices, vol.shape[0]))
    t = time.perf_counter()
    run_to_end(run_volume(pred, vol, slices=zs, batch_size=4))
    dt = time.perf_counter() - t
    print(json.dumps({"threads": n, "torch_threads": torch.get_num_threads(),
                      "wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"),
                      "slices_per_s": (zs[1] - zs[0]) / dt}))


def measure(threads: str, policy: str | None, load: int, slices: int, inp: str | None) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"), HF_HUB_OFFLINE="1")
    env.pop("OMP_NUM_THREADS", None)
    env.pop("OMP_WAIT_POLICY", None)
    if policy:
        env["OMP_WAIT_POLICY"] = policy
    cmd = [sys.executable, __file__, "--child", "--threads", threads, "--slices", str(slices)]
    if inp:
        cmd += ["--input", inp]
    stop = mp.Event()
    procs = [mp.Process(target=_spin, args=(stop,), daemon=True) for _ in range(load)]
    for p in procs:
        p.start()
    try:
        la = os.getloadavg()[0]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
    finally:
        stop.set()
        for p in procs:
            p.join(5)
    rec = json.loads(out.strip().splitlines()[-1])
    rec.update(policy=rec.pop("wait_policy"), load=load, loadavg=la, requested=threads)
    return rec


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--threads", default="default")
    ap.add_argument("--slices", type=int, default=16)
    ap.add_argument("--input", default=str(CT) if CT.is_file() else None)
    ap.add_argument("--load-procs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--repeats", type=int, default=2, help="interleaved rounds; the table shows medians")
    ap.add_argument("--configs", default="1,cpu,default",
                    help="comma list: N | cpu (= all CPUs) | default, each optionally :POLICY "
                         "(OMP_WAIT_POLICY, e.g. PASSIVE)")
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    ncpu = os.cpu_count() or 1
    print(f"CPU: {ncpu} logical CPUs ({cpu_model_name()}); input: {args.input or 'phantom'}; "
          f"{args.slices} slices, batch 4, fp32; background load: {args.load_procs} busy processes; "
          f"{args.repeats} interleaved rounds (median)")
    specs = []
    for spec in args.configs.split(","):
        th, _, pol = spec.partition(":")
        specs.append((str(ncpu) if th == "cpu" else th, pol or None))
    runs: dict[tuple, list[dict]] = {}
    for rnd in range(args.repeats):
        for th, pol in specs:
            for load in (0, args.load_procs):
                r = measure(th, pol, load, args.slices, args.input)
                runs.setdefault((th, pol, load), []).append(r)
                print(f"  round {rnd + 1}: threads={th:>7} ({r['torch_threads']}) wait={r['policy']:>8} "
                      f"load={load}: {r['slices_per_s']:.2f} slices/s (loadavg {r['loadavg']:.2f})", flush=True)
    print()
    print(f"{'threads':>9} {'set':>4} {'OMP wait':>9} {'no added load':>14} {'+' + str(args.load_procs) + ' busy':>9} "
          f"{'slow-down':>10} {'loadavg':>8}")
    for th, pol in specs:
        a, b = runs[(th, pol, 0)], runs[(th, pol, args.load_procs)]
        sa = statistics.median(r["slices_per_s"] for r in a)
        sb = statistics.median(r["slices_per_s"] for r in b)
        la = statistics.median(r["loadavg"] for r in a + b)
        n = "/".join(sorted({str(r["torch_threads"]) for r in a + b}))
        pol = "/".join(sorted({r["policy"] for r in a + b}))
        print(f"{th:>9} {n:>4} {pol:>9} {sa:>10.2f} sl/s {sb:>6.2f} sl/s {sa / sb:>9.2f}x {la:>8.1f}")


if __name__ == "__main__":
    main()
