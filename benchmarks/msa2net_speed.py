"""MSA²Net CPU inference speed: slices/s per configuration, batch size and precision.

Rows per model configuration (random weights; speed does not depend on them):

- ``batch 1 / batch 8``, ``fp32`` or ``bf16`` (``torch.autocast("cpu", torch.bfloat16)``): model
  forward only, input already at the model size.
- ``official-style``: what the official ``utils.test_single_volume`` does per slice: a 512x512
  slice zoomed to the model size with ``scipy.ndimage.zoom(order=3)``, normalised
  ((x - 0.5) / 0.5), batch 1, fp32 forward, ``argmax(softmax(logits))``, the label map zoomed
  back to 512x512 with ``zoom(order=0)``.

Timing: a warm-up, then ``--iters`` timed calls; slices/s from the median call (and the best call,
which is what an idle machine gives: the 2-core CPU here is shared with other jobs). Ratios are to
the official-style path of the same configuration. Prints a table; asserts nothing.

    PYTHONPATH=src .venv/bin/python benchmarks/msa2net_speed.py [--quick] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
import torch
from scipy.ndimage import zoom

from napari_genseg.models import registry


def _time_calls(fn, iters: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def _forward_fn(model, batch: int, size: int, bf16: bool):
    x = torch.rand(batch, model.config.in_chans, size, size)

    def run():
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            return model(x)

    return run


def _official_style_fn(model, size: int, full: int = 512):
    """One slice through the official test loop's per-slice steps (utils.test_single_volume)."""
    rng = np.random.default_rng(0)
    slice_ = rng.random((full, full), dtype=np.float32)

    def run():
        small = zoom(slice_, (size / full, size / full), order=3)
        x = (torch.from_numpy(small.astype(np.float32))[None, None] - 0.5) / 0.5
        with torch.no_grad():
            out = torch.argmax(torch.softmax(model(x), dim=1), dim=1).squeeze(0)
        return zoom(out.numpy(), (full / size, full / size), order=0)

    return run


def bench_config(name: str, iters1: int, iters8: int, warmup: int) -> list[tuple]:
    model = registry.create_model(name).eval()
    size = model.config.img_size
    n_params = registry.count_parameters(model)
    rows = []
    cases = [
        ("official-style b1 fp32 (zoom 512->%d->512)" % size, 1, _official_style_fn(model, size), iters1),
        ("batch 1 fp32", 1, _forward_fn(model, 1, size, False), iters1),
        ("batch 1 bf16", 1, _forward_fn(model, 1, size, True), iters1),
        ("batch 8 fp32", 8, _forward_fn(model, 8, size, False), iters8),
        ("batch 8 bf16", 8, _forward_fn(model, 8, size, True), iters8),
    ]
    for label, batch, fn, iters in cases:
        times = _time_calls(fn, iters, warmup)
        rows.append((name, n_params, size, label, batch / statistics.median(times), batch / min(times)))
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer iterations")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: default)")
    parser.add_argument(
        "--configs", nargs="+", default=["msa2net_paper", "msa2net_demo"], help="registered config names"
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    iters1, iters8, warmup = (4, 2, 1) if args.quick else (12, 4, 2)

    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
        f"load average {os.getloadavg()[0]:.2f} at start"
    )
    header = f"{'config':<16} {'params':>9} {'size':>4}  {'path':<42} {'sl/s med':>9} {'sl/s best':>9} {'x official':>10}"
    print(header)
    print("-" * len(header))
    for name in args.configs:
        rows = bench_config(name, iters1, iters8, warmup)
        base = rows[0][4]
        for cfg, n, size, label, med, best in rows:
            print(f"{cfg:<16} {n / 1e6:>8.2f}M {size:>4}  {label:<42} {med:>9.2f} {best:>9.2f} {med / base:>10.2f}")
    print(f"load average {os.getloadavg()[0]:.2f} at end")


if __name__ == "__main__":
    main()
