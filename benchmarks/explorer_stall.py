"""AR-Seg explorer: the GUI event loop's stalls while a run works and while slices are scrubbed.

    xvfb-run -a -s "-screen 0 1600x1000x24" env PYTHONPATH=src .venv/bin/python \
        benchmarks/explorer_stall.py [--config arseg_paper] [--slices 2] [--threads 1] [--scrub-seconds 20]

Builds ``--config`` with seeded random weights (timing only; written to a temporary checkpoint),
docks the AR-Seg explorer in a napari viewer over a synthetic CT of Z x 512 x 512 voxels, runs
AR-Seg (N = 16) on ``--slices`` slices, then scrubs the slider: every 100 ms the current slice
moves one step back and forth over the run slices and their neighbours, once per "show" mode
(consensus, scales, sample; scales and sample make the explorer decode tokens in its worker),
after one unmeasured pass through the modes (first-time shader and glyph costs).
A 10 ms QTimer records the event loop's ticks throughout; per phase it prints the longest,
99th-percentile and median gap between ticks (a stall = a gap well above 10 ms), the number of
slice changes and of decode jobs finished. Next to each wall-clock gap it reads the GUI thread's
own CPU time over that gap (``time.thread_time``): work the plugin does on the GUI thread shows in
both, a machine busy with other processes only in the wall-clock gap. The "idle" phase (nothing
running, nothing scrubbed) measures that background. Last column: the explorer's own event
handlers on the GUI thread (slice change, decode results, run progress): calls, their p99
wall-clock time, their p99 and longest GUI-thread CPU time (wall-clock inflates when the machine
is shared; CPU does not); the rest of a gap is napari's slicing and drawing (software OpenGL under
Xvfb) and the other processes on the machine. Asserts nothing.
"""

from __future__ import annotations

import argparse
import functools
import os
import tempfile
import time
from pathlib import Path

import numpy as np


def _spin(cond, limit_s: float) -> None:
    from qtpy.QtWidgets import QApplication

    end = time.perf_counter() + limit_s
    while not cond() and time.perf_counter() < end:
        QApplication.processEvents()
        time.sleep(0.002)


#: the explorer's entry points from the event loop, timed on the GUI thread
HANDLERS = ("_on_slice", "_on_show", "_on_decoded", "_on_decoder_finished", "_on_progress", "_on_finished")
_calls: list[float] = []


def _timed(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        t0, c0 = time.perf_counter(), time.thread_time()
        try:
            return fn(*args, **kwargs)
        finally:
            _calls.append(((time.perf_counter() - t0) * 1000, (time.thread_time() - c0) * 1000))

    return wrapper


def _tick(ticks: list) -> None:
    ticks.append((time.perf_counter(), time.thread_time()))


def _report(name: str, ticks: list, extra: str = "") -> None:
    if len(ticks) < 2:
        print(f"{name:<22} no ticks")
        return
    t = np.asarray(ticks) * 1000
    wall, cpu = np.diff(t[:, 0]), np.diff(t[:, 1])
    if _calls:
        c = np.asarray(_calls)
        h = (f"{len(c):>5} {np.percentile(c[:, 0], 99):>6.0f} {np.percentile(c[:, 1], 99):>6.1f} "
             f"{c[:, 1].max():>6.1f}")
    else:
        h = f"{0:>5} {'-':>6} {'-':>6} {'-':>6}"
    _calls.clear()
    print(f"{name:<22} {len(ticks):>6} {wall.max():>7.0f} {np.percentile(wall, 99):>7.0f} "
          f"{np.median(wall):>6.0f} {cpu.max():>8.0f} {np.percentile(cpu, 99):>8.0f}  {h}  {extra}")


def _scrub(viewer, path: list[int], ticks: list, seconds: float) -> int:
    """Move the current slice along ``path`` every 100 ms for ``seconds``; the number of moves."""
    from qtpy.QtCore import QTimer

    steps = {"i": 0}

    def step():
        steps["i"] += 1
        viewer.dims.set_current_step(0, path[steps["i"] % len(path)])

    scrub = QTimer()
    scrub.timeout.connect(step)
    ticks.clear()
    scrub.start(100)
    end = time.perf_counter() + seconds
    _spin(lambda: time.perf_counter() > end, seconds + 1)
    scrub.stop()
    return steps["i"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="arseg_paper")
    ap.add_argument("--slices", type=int, default=2)
    ap.add_argument("--size", type=int, default=512, help="in-plane voxels of the synthetic CT")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    ap.add_argument("--scrub-seconds", type=float, default=20.0, help="per show mode")
    a = ap.parse_args()

    import torch

    torch.set_num_threads(a.threads)
    import napari
    from qtpy.QtCore import QTimer

    from napari_genseg.models import registry
    from napari_genseg.models.checkpoints import save_checkpoint
    from napari_genseg.phantom import make_phantom
    from napari_genseg.ui.arseg_explorer import ArSegExplorer
    from napari_genseg.ui.layers import image_layer_data
    from napari_genseg.volume import Volume

    for name in HANDLERS:
        setattr(ArSegExplorer, name, _timed(getattr(ArSegExplorer, name)))
    entry = registry.get_entry(a.config)
    torch.manual_seed(0)
    model = registry.get_family(entry.family).build(entry.config)
    tmp = Path(tempfile.mkdtemp())
    ckpt = save_checkpoint(tmp / f"{a.config}.safetensors", model, entry.family, a.config, entry.config,
                           ["background", "liver", "spleen", "lesion"][: entry.config.num_classes + 1],
                           {"normalization": {"kind": "minmax"}, "grid": "resize"})
    del model
    z_total = 2 * a.slices + 4
    ph = make_phantom(seed=3, shape=(z_total, a.size, a.size), spacing=(3.0, 0.8, 0.8))
    viewer = napari.Viewer(show=True)
    data, kw, _ = image_layer_data(Volume(ph.image, spacing=ph.spacing), "ct")
    viewer.add_image(data, **kw)
    w = ArSegExplorer(viewer)
    viewer.window.add_dock_widget(w, name="AR-Seg explorer")
    w._model.value = a.config
    w._checkpoint.value = str(ckpt)
    w._device.value = "cpu"
    w._samples.value = 16
    first = z_total // 2 - a.slices // 2
    w._scope.value = "range"
    w._start.value, w._stop.value = first, first + a.slices - 1
    w._batch.value = 1

    ticks: list = []
    timer = QTimer()
    timer.timeout.connect(lambda: _tick(ticks))
    timer.start(10)
    print(f"{a.config} (random weights), N = 16, CT {z_total}x{a.size}x{a.size}, torch threads "
          f"{torch.get_num_threads()}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    print(f"{'':<22} {'':>6} {'gap between ticks, ms':^22} {'GUI-thread CPU':^17}  "
          f"{'explorer handlers, ms':^26}")
    print(f"{'phase':<22} {'ticks':>6} {'max':>7} {'p99':>7} {'median':>6} {'max':>8} {'p99':>8}  "
          f"{'calls':>5} {'p99 wall':>6} {'p99 CPU':>6} {'max CPU':>6}")
    _spin(lambda: False, 5)
    _report("idle", ticks)
    path = [*range(first - 2, first + a.slices + 2)]
    path = path + path[-2:0:-1]  # back and forth
    _scrub(viewer, path, ticks, a.scrub_seconds)
    _report("scrub, CT only", ticks, "napari alone: the image layer, no explorer layers yet")
    ticks.clear()
    t0 = time.perf_counter()
    viewer.dims.set_current_step(0, first)
    t_click = time.perf_counter()
    w.run()
    print(f"Run click: {(time.perf_counter() - t_click) * 1000:.0f} ms on the GUI thread (model load, "
          "image signature, layers)")
    _spin(lambda: w.worker is None, 3600)
    _spin(lambda: w._decoder is None, 600)
    _report("run", ticks, f"{a.slices} slice(s) in {time.perf_counter() - t0:.0f} s")

    jobs = {"n": 0}
    decode = w.predictor.decode_samples

    def counting(*args, **kwargs):
        out = decode(*args, **kwargs)
        jobs["n"] += 1
        return out

    w.predictor.decode_samples = counting
    # warm-up: first-time costs of each view (shader compilation, overlay glyphs), not measured
    for show in ("consensus", "scales", "sample", "variability"):
        w._show.value = show
        for z in path[:4]:
            viewer.dims.set_current_step(0, z)
            _spin(lambda: False, 0.2)
    _spin(lambda: w._decoder is None, 600)
    for show in ("consensus", "scales", "sample"):
        w._show.value = show
        jobs["n"] = 0
        _calls.clear()
        n = _scrub(viewer, path, ticks, a.scrub_seconds)
        _report(f"scrub, show {show}", ticks, f"{n} slice changes, {jobs['n']} decode jobs done")
        _spin(lambda: w._decoder is None, 600)
    timer.stop()
    print(f"load average at the end {os.getloadavg()[0]:.1f}")
    viewer.close()


if __name__ == "__main__":
    main()
