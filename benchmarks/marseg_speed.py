"""MARSeg CPU forward time per 256² slice (a quick measurement of the bare model; the comparison
against an official-style forward, the batched and bf16 paths and the mask agreement are
``marseg_official_speed.py``, its table ``marseg_speed.md``).

Rows: ``marseg_paper`` inference build (what segmentation runs: 206.9 M parameters, no diffusion
head) and, for reference, the full build (the same forward; the diffusion head only costs memory),
batch 1, fp32, random weights (speed does not depend on them), ``torch.no_grad``.

Timing: a warm-up call, then ``--iters`` timed calls; the median and the best call are printed
(the best is what an idle machine gives: the 2-core CPU here is shared). The thread count is
printed; default 1. Asserts nothing.

    PYTHONPATH=src .venv/bin/python benchmarks/marseg_speed.py [--threads 1] [--iters 3] [--full]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from napari_genseg.device import cpu_model_name

from napari_genseg.models import registry


def _isa() -> str:
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return "?"
    return "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"


def time_forward(model: torch.nn.Module, size: int, chans: int, batch: int, iters: int) -> list[float]:
    x = torch.rand(batch, chans, size, size) * 2 - 1
    times = []
    with torch.no_grad():
        model(x)  # warm-up
        for _ in range(iters):
            t0 = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - t0)
    return times


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--config", default="marseg_paper")
    ap.add_argument("--full", action="store_true", help="also time the full (training) build")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"CPU: {cpu_model_name()} ({_isa()}, {os.cpu_count()} logical cores), torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread(s), load average {os.getloadavg()[0]:.1f}")
    builds = [("inference build", True)] + ([("full build", False)] if args.full else [])
    print(f"{'config':<14} {'build':<16} {'params run':>12} {'median s/slice':>15} {'best s/slice':>13}")
    for label, inference_only in builds:
        model = registry.create_model(args.config, inference_only=inference_only).eval()
        cfg = model.cfg
        times = time_forward(model, cfg.img_size, cfg.in_chans, 1, args.iters)
        print(f"{args.config:<14} {label:<16} {model.num_inference_parameters():>12,} "
              f"{statistics.median(times):>15.2f} {min(times):>13.2f}")
        del model
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
