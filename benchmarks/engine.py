"""Engine throughput (slices/s) and the longest GUI event-loop stall during a widget run.

    .venv/bin/python benchmarks/engine.py [--model msa2net] [--checkpoint F] [--input CT] [--gui]

Headless part: run_volume over the CT for several batch sizes and precisions, slices/s printed.
--gui (needs an X server; wrap in xvfb-run): runs the Segment dock in a napari viewer while a
10 ms QTimer measures the gaps of the event loop; prints the longest and 99th-percentile stall.
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def headless(ckpt, vol, batch_sizes, precisions, device):
    from napari_genseg.engine import run_to_end, run_volume
    from napari_genseg.predictors import make_predictor

    print(f"model {ckpt.config_name} on {vol.shape} (z, y, x), device {device}")
    print(f"{'batch':>5} {'precision':>9} {'slices/s':>9} {'s/slice':>8}")
    results = {}
    for prec in precisions:
        for bs in batch_sizes:
            pred = make_predictor(ckpt, device=device, precision=prec)
            run_to_end(run_volume(pred, vol, slices=(0, min(bs, vol.shape[0])), batch_size=bs))  # warm-up
            pred = make_predictor(ckpt, device=device, precision=prec)
            t = time.perf_counter()
            res = run_to_end(run_volume(pred, vol, batch_size=bs))
            dt = time.perf_counter() - t
            results[(prec, bs)] = res.labels
            print(f"{bs:>5} {prec:>9} {vol.shape[0] / dt:>9.2f} {dt / vol.shape[0]:>8.3f}")
    if ("fp32", batch_sizes[-1]) in results and ("bf16", batch_sizes[-1]) in results:
        a, b = results[("fp32", batch_sizes[-1])], results[("bf16", batch_sizes[-1])]
        print(f"bf16 vs fp32 label agreement: {(a == b).mean() * 100:.3f} % of voxels")


def gui(model, checkpoint, vol, batch):
    import napari
    from qtpy.QtCore import QTimer
    from qtpy.QtWidgets import QApplication

    from napari_genseg.ui.layers import image_layer_data
    from napari_genseg.ui.segment_widget import SegmentWidget

    viewer = napari.Viewer(show=True)
    data, kw, _ = image_layer_data(vol, "ct")
    viewer.add_image(data, **kw)
    w = SegmentWidget(viewer)
    viewer.window.add_dock_widget(w)
    w._model.value = model
    if checkpoint:
        w._checkpoint.value = checkpoint
    w._batch.value = batch
    ticks = []
    timer = QTimer()
    timer.timeout.connect(lambda: ticks.append(time.perf_counter()))
    timer.start(10)
    t0 = time.perf_counter()
    w.run()
    while w.worker is not None:
        QApplication.processEvents()
        time.sleep(0.002)
    dt = time.perf_counter() - t0
    timer.stop()
    gaps = np.diff(ticks) * 1000
    print(f"GUI run: {vol.shape[0]} slices in {dt:.1f} s ({vol.shape[0] / dt:.2f} slices/s, batch {batch})")
    print(f"event loop: {len(ticks)} ticks of a 10 ms timer; longest stall {gaps.max():.0f} ms, "
          f"p99 {np.percentile(gaps, 99):.0f} ms, median {np.median(gaps):.0f} ms")
    viewer.close()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="msa2net")
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--input", default="../shared/data/real/ct-abdomen/ct_thorax_abdomen_unlabeled.nii.gz")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch-sizes", default="1,8")
    ap.add_argument("--precisions", default="fp32,bf16")
    ap.add_argument("--gui", action="store_true")
    a = ap.parse_args()
    from napari_genseg.io import load_volume
    from napari_genseg.models.checkpoints import resolve_model

    vol = load_volume(a.input)
    ckpt = resolve_model(a.model, a.checkpoint)
    headless(ckpt, vol, [int(b) for b in a.batch_sizes.split(",")], a.precisions.split(","), a.device)
    if a.gui:
        gui(a.model, a.checkpoint, vol, int(a.batch_sizes.split(",")[-1]))


if __name__ == "__main__":
    main()
