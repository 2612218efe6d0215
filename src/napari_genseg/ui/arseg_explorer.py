"""AR-Seg explorer dock: run AR-Seg, animate the coarse-to-fine scales, browse samples, see variability.

Layers it manages for image ``I`` ("show" makes exactly the chosen one visible; each but the
consensus is added the first time its view is shown):

* ``I [arseg] consensus`` (Labels): mean of the N sample masks > threshold; the threshold slider
  updates it live on every slice of the current results (each change is one undo step);
* ``I [arseg] scale k/K`` (Labels): the consensus of f̂_k decoded after scale k (k = 1..8) on the
  current slice; play / pause / step / loop at a chosen speed; k is also in the canvas overlay;
* ``I [arseg] sample k/N`` (Labels): sample k of the current slice;
* ``I [arseg] variability`` (Image, inferno-like ramp with 0 transparent): the percentage of the N
  samples that disagree with the consensus shown (``predictors.uncertainty``); 0 = all agree, at
  most 50 % at threshold 0.5 and 100·max(t, 1 − t) % at threshold t: the colour range follows.

Results are kept per ``arseg_state.RunKey`` (image, checkpoint, seed, target class, N): a run
with another key drops the old votes and tokens. Samples and scales of a slice are decoded from
its tokens in a worker thread when the slice is shown (the GUI thread only writes one slice into
the layers). Export writes the scale progression of the current slice (GIF, MP4 or PNG strip).
The Box tab (``ui/arseg_roi.py``) runs a crop-trained checkpoint in a box the user draws (region-
of-interest mode) and pastes its consensus into a Labels layer as one undo step. The Edit tab
(``ui/arseg_redraw.py``) lets the reader correct the consensus at a coarse scale k and redraw
scales k+1..K (``ArSegPredictor.redraw``), again as one undo step.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from magicgui.widgets import (
    CheckBox,
    ComboBox,
    Container,
    FileEdit,
    FloatSlider,
    Label,
    ProgressBar,
    PushButton,
    RadioButtons,
    Slider,
    SpinBox,
    create_widget,
)

from ..device import PRECISIONS
from ..errors import InputError
from ..engine import parse_slices, run_volume
from ..models import registry
from ..predictors import ArSegPredictor, make_predictor, predictor_class
from ..predictors.uncertainty import max_disagreement_percent
from ._run import LayerEdit, add_class_labels, load_model, notify_error, reports_runtime_errors
from .arseg_export import render_progression_frames, save_progression
from .arseg_state import ArSegResults, RunKey, checkpoint_signature, decode_composite, image_signature
from .layers import volume_from_layer

__all__ = ["ArSegExplorer", "SHOW_CHOICES"]

#: what "show" can make visible (one layer each)
SHOW_CHOICES = ("consensus", "scales", "sample", "variability")


def variability_colormap():
    """Inferno-like ramp whose zero is transparent, so agreement leaves the CT visible."""
    from napari.utils.colormaps import Colormap

    return Colormap(
        colors=[[0.0, 0.0, 0.0, 0.0], [0.34, 0.06, 0.43, 0.55], [0.73, 0.21, 0.33, 0.8],
                [0.98, 0.55, 0.04, 0.95], [0.99, 1.0, 0.64, 1.0]],
        name="genseg_variability", display_name="variability (inferno, 0 transparent)",
    )


def _legend(threshold: float) -> str:
    top = max_disagreement_percent(threshold)
    return f"variability: % of the N samples disagreeing with the consensus shown (0–{top:.0f} %)"


class ArSegExplorer(Container):
    """The AR-Seg dock: tabs Run / View / Edit / Export / Box above Run-Cancel, progress and status."""

    def __init__(self, napari_viewer):
        super().__init__(labels=False)
        import napari
        from qtpy.QtCore import QTimer
        from qtpy.QtWidgets import QTabWidget

        self.viewer = napari_viewer
        self.worker = None
        self._decoder = None
        self._decode_failed: tuple | None = None
        self._edit = None
        self.predictor: ArSegPredictor | None = None
        self.volume = None
        self.results: ArSegResults | None = None
        self._results_image = None
        self._class_names: list[str] = []
        self._layers: dict[str, object] = {}
        self._written: dict[str, int] = {}  # layer key -> the slice it holds
        self._before: tuple | None = None  # the state a run that writes no slice gives back
        self._wrote = False  # the current run has written a slice

        # ---- Run tab
        self._image = create_widget(annotation=napari.layers.Image, label="image")
        names = [e.name for e in registry.list_configs("arseg")] if "arseg" in {f.name for f in registry.list_families()} else []
        self._model = ComboBox(label="model", choices=(["arseg"] + names) if names else [],
                               tooltip="arseg = shipped demo weights; a config needs a checkpoint")
        self._checkpoint = FileEdit(label="checkpoint", mode="r", filter="*.safetensors")
        # choices come from a callable: napari calls reset_choices() on docked widgets whenever
        # layers change, which would reset a plain list to the constructor's (empty) one
        self._target_list: list[tuple[str, int]] = [("foreground", 1)]
        self._target = ComboBox(label="target class", choices=lambda _w: self._target_list,
                                tooltip="the class AR-Seg segments (AdaLN conditioning)")
        self._samples = SpinBox(label="samples N", min=1, max=32, value=16)
        self._seed = SpinBox(label="seed", min=0, max=2**31 - 1, value=0)
        self._scope = RadioButtons(label="slices", choices=["current", "range", "all"], value="current",
                                   orientation="horizontal")
        self._start = SpinBox(label="from slice", min=0, max=100000, visible=False)
        self._stop = SpinBox(label="to slice (incl.)", min=0, max=100000, visible=False)
        self._device = ComboBox(label="device", choices=["auto", "cpu", "cuda", "mps"], value="auto")
        self._precision = ComboBox(label="precision", choices=list(PRECISIONS), value="auto")
        self._batch = SpinBox(label="slices per batch", min=1, max=32, value=2)
        run_tab = Container(widgets=[self._image, self._model, self._checkpoint, self._target, self._samples,
                                     self._seed, self._scope, self._start, self._stop, self._device,
                                     self._precision, self._batch])
        # ---- View tab
        self._show = ComboBox(label="show", choices=list(SHOW_CHOICES), value="consensus",
                              tooltip="the one result layer to show over the image")
        self._threshold = FloatSlider(label="consensus >", min=0.05, max=0.95, step=0.05, value=0.5)
        self._legend = Label(value=_legend(0.5))
        self._legend.native.setWordWrap(True)
        self._sample = SpinBox(label="sample #", min=1, max=32, value=1)
        self._scale = Slider(label="scale", min=1, max=8, value=8)
        self._play = PushButton(text="Play")
        self._step = PushButton(text="Step")
        self._loop = CheckBox(text="loop", value=True)
        self._fps = SpinBox(label="speed (scales/s)", min=1, max=20, value=2)
        anim = Container(widgets=[self._play, self._step, self._loop], layout="horizontal", labels=False,
                         label="animation")
        anim.margins = (0, 0, 0, 0)
        view_tab = Container(widgets=[self._show, self._threshold, self._legend, self._sample, self._scale,
                                      anim, self._fps])
        # ---- Export tab
        self._export_path = FileEdit(label="export to", mode="w", filter="*.gif *.png *.mp4",
                                     value="arseg_scales.gif")
        self._export = PushButton(text="Export scale progression of the current slice")
        export_tab = Container(widgets=[self._export_path, self._export])
        # ---- Box tab: region-of-interest mode (ui/arseg_roi.py)
        from .arseg_roi import RoiPanel

        self.roi = RoiPanel(self)
        # ---- Edit tab: correct a coarse scale and redraw the finer ones (ui/arseg_redraw.py)
        from .arseg_redraw import RedrawPanel

        self.redraw = RedrawPanel(self)
        self._tab_containers = (run_tab, view_tab, self.redraw, export_tab, self.roi)
        self._tabs = QTabWidget()
        for tab, title in zip(self._tab_containers, ("Run", "View", "Edit", "Export", "Box")):
            self._tabs.addTab(tab.native, title)
        # ---- always visible
        self._run = PushButton(text="Run AR-Seg")
        self._cancel = PushButton(text="Cancel", enabled=False)
        buttons = Container(widgets=[self._run, self._cancel], layout="horizontal", labels=False)
        buttons.margins = (0, 0, 0, 0)
        self._progress = ProgressBar(min=0, max=100, value=0)
        self._status = Label(value="")
        self.extend([buttons, self._progress, self._status])
        self.native.layout().insertWidget(0, self._tabs)

        self._timer = QTimer()
        self._timer.timeout.connect(self._tick)
        self._ticking = False
        self._run.changed.connect(self.run)
        self._cancel.changed.connect(self.cancel)
        self._model.changed.connect(self._refresh_targets)
        self._checkpoint.changed.connect(self._refresh_targets)
        self._refresh_targets()
        self._scope.changed.connect(self._on_scope)
        self._threshold.changed.connect(self._on_threshold)
        self._show.changed.connect(self._on_show)
        self._sample.changed.connect(self._on_sample)
        self._scale.changed.connect(self._on_scale)
        self._play.changed.connect(self.toggle_play)
        self._step.changed.connect(self._on_step)
        self._fps.changed.connect(lambda *_: self._timer.setInterval(int(1000 / self._fps.value)))
        self._export.changed.connect(self.export)
        self.viewer.dims.events.current_step.connect(self._on_slice)
        self.viewer.layers.events.inserted.connect(lambda e: self._image.reset_choices())
        self.viewer.layers.events.removed.connect(lambda e: self._image.reset_choices())

    def reset_choices(self, *_):
        """napari calls this on docked widgets when layers change: reach the tabs' widgets too."""
        super().reset_choices()
        for tab in getattr(self, "_tab_containers", ()):
            tab.reset_choices()

    # ------------------------------------------------------------------ helpers
    def _on_scope(self, *_):
        rng = self._scope.value == "range"
        self._start.visible = self._stop.visible = rng

    def _refresh_targets(self, *_):
        from ..models.checkpoints import peek_class_names

        names = peek_class_names(self._model.value or "arseg", self._checkpoint_path())
        self._target_list = [(n, i) for i, n in enumerate(names) if i > 0] or [("foreground", 1)]
        self._target.reset_choices()
        self._target.value = self._target_list[0][1]

    def current_slice(self) -> int:
        image = self._image.value
        return int(round(image.world_to_data(self.viewer.dims.point)[0])) if image is not None else 0

    def _checkpoint_path(self):
        v = self._checkpoint.value
        return None if v is None or str(v) in ("", ".") or Path(v).is_dir() else str(v)

    def _layer(self, key):
        lay = self._layers.get(key)
        return lay if lay is not None and lay in self.viewer.layers else None

    def _display_labels(self, image, name: str, class_names):
        """A Labels layer for one slice at a time (sample / scale), found by its name's stem (its
        title carries "k/N") or added."""
        for lay in self.viewer.layers:
            if lay.name.startswith(name) and lay.data.shape == image.data.shape and hasattr(lay, "selected_label"):
                return lay
        return add_class_labels(self.viewer, image, name, class_names, visible=False)

    def _ensure_layer(self, key: str):
        """The layer of view ``key`` for the results' image, added (and filled) the first time the
        view is shown: napari slices every layer on every slice change, hidden ones included."""
        lay = self._layer(key)
        image, res = self._results_image, self.results
        if lay is not None or res is None or image is None or image not in self.viewer.layers:
            return lay
        base = f"{image.name} [arseg]"
        if key == "variability":
            lay = self._variability_layer(image, f"{base} variability")
            lay.data[:] = 0
            if res.tokens:
                lay.data[res.slices] = res.disagreement(res.slices, float(self._threshold.value))
            lay.refresh()
        elif key in ("sample", "scales"):
            lay = self._display_labels(image, f"{base} {'sample' if key == 'sample' else 'scale'}",
                                       self._class_names)
        else:
            return None
        self._layers[key] = lay
        return lay

    def _clear_written(self) -> None:
        """Blank the slices the sample / scale layers show (their results were dropped)."""
        for key, z in list(self._written.items()):
            lay = self._layer(key)
            if lay is not None:
                lay.data[z] = 0
                lay.refresh()
        self._written.clear()

    def _variability_layer(self, image, name: str):
        """The variability Image layer of ``image`` (re-used by name when its shape fits)."""
        if name in self.viewer.layers and self.viewer.layers[name].data.shape == image.data.shape:
            return self.viewer.layers[name]
        thr = float(self._threshold.value)
        return self.viewer.add_image(
            np.zeros(image.data.shape, np.uint8), name=name, scale=image.scale, translate=image.translate,
            colormap=variability_colormap(), contrast_limits=(0, max_disagreement_percent(thr)),
            opacity=0.8, blending="translucent", visible=False,
            metadata={"units": "% of the N samples disagreeing with the consensus shown"})

    # ------------------------------------------------------------------ run
    def run(self, *_):
        """Start a run (returns the worker, or None when the input was refused)."""
        from napari.qt.threading import thread_worker

        if self.worker is not None or self.redraw.worker is not None:
            return None
        image = self._image.value
        if image is None:
            notify_error("Choose an image layer first.")
            return None
        try:  # the dock's own options: these only parse and range-check
            vol = volume_from_layer(image.data, image.metadata, image.scale, image.translate)
            if self._scope.value == "range":
                if self._stop.value < self._start.value:
                    raise ValueError(f"empty slice range {self._start.value}..{self._stop.value}")
                spec, cur = (int(self._start.value), int(self._stop.value) + 1), None
            else:
                spec, cur = self._scope.value, self.current_slice()
            zs = parse_slices(spec, vol.shape[0], cur)
        except ValueError as exc:
            notify_error(str(exc))
            return None
        try:  # the checkpoint and the predictor's options: InputError; anything else is a bug
            ckpt = load_model(self._model.value or "arseg", self._checkpoint_path())
            if not issubclass(predictor_class(ckpt.family), ArSegPredictor):
                raise InputError(f"{ckpt.family} is not an AR-Seg checkpoint; use the Segment CT dock")
            if (ckpt.input or {}).get("roi"):
                raise InputError("this checkpoint was trained on regions of interest: draw a box in the Box tab")
            pred = make_predictor(ckpt, device=self._device.value, precision=self._precision.value,
                                  n_samples=int(self._samples.value), seed=int(self._seed.value),
                                  target_class=int(self._target.value or 1))
        except InputError as exc:
            notify_error(exc)
            return None
        key = RunKey(image_signature(image.unique_id, vol.data, vol.spacing), checkpoint_signature(ckpt),
                     pred.seed, pred.target_class, pred.n)
        cons_name = f"{image.name} [arseg] consensus"
        # what a run that ends before its first slice gives back (_give_back)
        self._before = (self.results, self.volume, self.predictor, self._results_image, dict(self._layers),
                        list(self._class_names), not (cons_name in self.viewer.layers
                                                      and self.viewer.layers[cons_name].data.shape == image.data.shape))
        self._wrote = False
        if self.results is None or self.results.key != key:
            self.results = ArSegResults(key, vol.shape, pred.num_scales)
            self._clear_written()
            self._layers.pop("variability", None)  # derived from the dropped votes: refilled when shown
        if image is not self._results_image:
            self._layers.clear()
        self.volume, self.predictor, self._results_image = vol, pred, image
        self._class_names = list(ckpt.class_names)
        self._decode_failed = None
        with self._sample.changed.blocked():
            self._sample.max = pred.n
        self._layers["consensus"] = add_class_labels(self.viewer, image, cons_name, self._class_names)
        self.redraw.watch(self._layers["consensus"])
        self._on_show()
        self._edit = LayerEdit(self._layers["consensus"]).begin()
        batch = int(self._batch.value)

        # errors reach notify_error; without ignore_errors napari would also re-raise them
        @thread_worker(start_thread=False, ignore_errors=True)
        @reports_runtime_errors
        def work():
            return (yield from run_volume(pred, vol, zs, batch_size=batch))

        self.worker = work()
        self.worker.yielded.connect(self._on_progress)
        self.worker.errored.connect(lambda exc: (notify_error(exc, "AR-Seg failed"),
                                                 setattr(self._status, "value", f"failed: {exc}")))
        self.worker.finished.connect(self._on_finished)
        self._run.enabled, self._cancel.enabled = False, True
        self._status.value = f"AR-Seg, N = {pred.n}, {len(zs)} slice(s)..."
        self.worker.start()
        return self.worker

    def _on_progress(self, p):
        self._wrote = True
        res = self.results
        z = list(p.z)
        res.add(z, p.outputs["votes"], p.outputs["tokens"])
        for zi in z:  # the run's mean wall time per slice so far (shown next to a redraw's)
            res.run_seconds[zi] = p.elapsed / max(p.done, 1)
        thr = float(self._threshold.value)
        if self._edit is not None:
            self._edit.set_slices(z, res.consensus(z, thr))
        var = self._layer("variability")
        if var is not None:
            var.data[z] = res.disagreement(z, thr)
            var.refresh()
        self._progress.value = int(round(100 * p.fraction))
        self._status.value = f"{p.done}/{p.total} slices, {p.elapsed / max(p.done, 1):.2f} s/slice"
        if self.current_slice() in z:
            self._show_slice()

    def _on_finished(self):
        if self._edit is not None:
            edit, self._edit = self._edit, None
            edit.end()
        worker, self.worker = self.worker, None
        self._run.enabled, self._cancel.enabled = True, False
        aborted = worker is not None and getattr(worker, "abort_requested", False)
        if (aborted or self._status.value.startswith("failed")) and not self._wrote:
            self._give_back()
        if aborted:
            self._status.value = ("cancelled; finished slices kept" if self._wrote
                                  else "cancelled before the first slice; the previous results are kept")
        elif not self._status.value.startswith("failed"):
            self._progress.value = 100
            self._status.value = f"done: {len(self.results.tokens)} slice(s), N = {self.results.n}"
            self._tabs.setCurrentIndex(1)  # on to the View tab
        self._show_slice()

    def _give_back(self) -> None:
        """After a run that failed or was cancelled before its first slice: the previous run's
        results (votes, tokens, samples, variability) back in place of the empty new ones, and a
        consensus layer this run created removed, so a cancelled "wrong N" loses nothing."""
        results, volume, predictor, image, layers, names, created = self._before
        cons = self._layers.get("consensus")
        if created and cons is not None and cons in self.viewer.layers:
            self.viewer.layers.remove(cons)
        if results is not self.results:
            self._clear_written()
            self.results, self.volume, self.predictor = results, volume, predictor
        self._results_image, self._class_names = image, names
        self._layers = layers
        if results is not None:
            with self._sample.changed.blocked():
                self._sample.max = results.n
        var = self._layer("variability")
        if var is not None and results is not None and results.tokens:
            var.data[:] = 0
            var.data[results.slices] = results.disagreement(results.slices, float(self._threshold.value))
            var.refresh()

    def cancel(self, *_):
        """Stop the run (finished slices stay) or the redraw (nothing of it is written)."""
        if self.worker is not None:
            self.worker.quit()
        self.redraw.cancel()

    # ------------------------------------------------------------------ results
    def _on_threshold(self, *_):
        thr = float(self._threshold.value)
        self._legend.value = _legend(thr)
        var = self._layer("variability")
        if var is not None:
            var.contrast_limits = (0, max_disagreement_percent(thr))
        lay, res = self._layer("consensus"), self.results
        if lay is None or res is None or not res.tokens or self.worker is not None:
            return
        self.redraw.sync()
        zs = res.slices
        edit = LayerEdit(lay).begin()
        try:
            edit.set_slices(zs, res.consensus(zs, thr))
        finally:
            edit.end()
        if var is not None:
            var.data[zs] = res.disagreement(zs, thr)
            var.refresh()
        self._show_scale()

    def _on_show(self, *_):
        self._ensure_layer(self._show.value)
        for key in SHOW_CHOICES:
            lay = self._layer(key)
            if lay is not None:
                lay.visible = key == self._show.value
        self._show_slice()

    def _on_slice(self, *_):
        self._show_slice()

    def _on_sample(self, *_):
        self._show.value = "sample"
        self._show_sample()

    def _on_scale(self, *_):
        if not self._ticking:
            self._show.value = "scales"
        self._show_scale()
        self.redraw.refresh_hint()

    def _on_step(self, *_):
        self._show.value = "scales"
        self.step_scale()

    # ------------------------------------------------------------------ decoding (worker thread)
    def _shown_slice(self) -> int | None:
        """The current slice when it has results for the image on screen, else None."""
        res = self.results
        if res is None or self._image.value is not self._results_image:
            return None
        z = self.current_slice()
        return z if z in res.tokens else None

    def _wanted(self) -> list[tuple[int, int]]:
        """Decode jobs (z, scale k) the view still needs, most urgent first: the full-scale
        samples when "sample" is shown; the scale shown, then the slice's other scales (for the
        animation) when "scales" is shown; nothing for consensus and variability."""
        z = self._shown_slice()
        if z is None:
            return []
        res = self.results
        K = res.num_scales
        if self._show.value == "sample":
            return [] if res.sample_mask(z, 0) is not None else [(z, K)]
        if self._show.value == "scales":
            k = min(int(self._scale.value), K)
            missing = set(res.missing_scales(z))
            return [(z, j) for j in [k, *range(k + 1, K + 1), *range(1, k)] if j in missing]
        return []

    def _pump(self) -> None:
        """Start the most urgent decode job in a worker thread unless one is running (when it ends,
        the slice then shown is served next)."""
        from napari.qt.threading import thread_worker

        if self._decoder is not None:
            return
        res, pred, vol = self.results, self.predictor, self.volume
        jobs = [j for j in self._wanted() if (res.key, *j) != self._decode_failed]
        if not jobs:
            return
        z, k = jobs[0]
        (version, tokens, regions), hw, spacing = res.decode_job(z), vol.shape[1:], vol.spacing[1:]

        @thread_worker(start_thread=False, ignore_errors=True)
        def decode():
            return res, z, k, version, decode_composite(pred, tokens, regions, hw, spacing, upto_scale=k)

        self._decoder = decode()
        self._decoder.returned.connect(self._on_decoded)
        self._decoder.errored.connect(lambda exc, job=(res.key, z, k): self._on_decode_error(job, exc))
        self._decoder.finished.connect(self._on_decoder_finished)
        self._decoder.start()

    def _on_decoded(self, out):
        res, z, k, version, masks = out
        res.store_scale(z, k, masks, version)

    def _on_decode_error(self, job, exc):
        self._decode_failed = job
        notify_error(exc, f"Decoding slice {job[1]} (scale {job[2]}) failed")

    def _on_decoder_finished(self):
        self._decoder = None
        self._show_slice()

    # ------------------------------------------------------------------ writing the shown slice
    def _write_slice(self, key: str, z: int, mask: np.ndarray | None) -> None:
        """Put ``mask`` (H, W) uint8 on slice z of a display layer, clearing the slice it held."""
        lay = self._layer(key)
        if lay is None:
            return
        old = self._written.pop(key, None)
        if old is not None and old != z:
            lay.data[old] = 0
        if mask is not None:
            lay.data[z] = mask
            self._written[key] = z
        elif old == z:
            lay.data[z] = 0
        if old is not None or mask is not None:
            lay.refresh()

    def _rename(self, key: str, name: str) -> None:
        lay = self._layer(key)
        if lay is not None and lay.name != name:
            lay.name = name

    def _show_slice(self):
        """Bring the layer shown (sample or scales) to the current slice with what is decoded,
        and queue the decoding the view still needs; hidden layers catch up when shown."""
        self.redraw.sync()
        self.redraw.refresh_hint()
        if self._show.value == "sample":
            self._show_sample()
        elif self._show.value == "scales":
            self._show_scale()
        else:
            self.text_overlay().visible = False
        self._pump()

    def _show_sample(self):
        z = self._shown_slice()
        if z is None or self._layer("sample") is None:
            return
        res = self.results
        k = min(int(self._sample.value), res.n) - 1
        mask = res.sample_mask(z, k)
        self._write_slice("sample", z, None if mask is None else mask.astype(np.uint8) * res.target_class)
        self._rename("sample", f"{self._results_image.name} [arseg] sample {k + 1}/{res.n}")

    def _show_scale(self):
        z = self._shown_slice()
        if z is None or self._layer("scales") is None:
            return
        res = self.results
        K = res.num_scales
        k = min(int(self._scale.value), K)
        votes = res.scale_votes(z, k)
        mask = None
        if votes is not None:
            mask = (res.consensus_of(votes, float(self._threshold.value)))
        self._write_slice("scales", z, mask)
        self._rename("scales", f"{self._results_image.name} [arseg] scale {k}/{K}")
        overlay = self.text_overlay()
        overlay.visible = self._show.value == "scales"
        overlay.text = (f"AR-Seg scale {k}/{K}  (slice {z}, N = {res.n})" if votes is not None
                        else f"AR-Seg scale {k}/{K}  (slice {z}: decoding...)")

    def progression(self, z: int) -> np.ndarray:
        """(K, H, W) float32: the mean of the N sample masks after each scale on slice z (the
        missing scales are decoded here). Raises ``KeyError`` for a slice without results."""
        res = self.results
        if res is None or z not in res.tokens:
            raise KeyError(f"no AR-Seg results on slice {z}")
        for k in res.missing_scales(z):
            version, tokens, regions = res.decode_job(z)
            res.store_scale(z, k, decode_composite(self.predictor, tokens, regions, self.volume.shape[1:],
                                                   self.volume.spacing[1:], upto_scale=k), version)
        return np.stack([res.scale_votes(z, k) for k in range(1, res.num_scales + 1)]).astype(np.float32) / res.n

    def text_overlay(self):
        """The canvas text overlay (napari >= 0.9: viewer.canvas.overlays['text'])."""
        canvas = getattr(self.viewer, "canvas", None)
        if canvas is not None and "text" in canvas.overlays:
            return canvas.overlays["text"]
        return self.viewer.text_overlay

    # ------------------------------------------------------------------ animation
    def step_scale(self, *_):
        k = int(self._scale.value)
        if k >= self._scale.max:
            if not self._loop.value:
                self.toggle_play(stop=True)
                return
            k = 0
        self._scale.value = k + 1

    def _tick(self):
        self._ticking = True
        try:
            self.step_scale()
        finally:
            self._ticking = False

    def toggle_play(self, *_, stop: bool = False):
        if self._timer.isActive() or stop:
            self._timer.stop()
            self._play.text = "Play"
        else:
            self._show.value = "scales"
            self._timer.start(int(1000 / self._fps.value))
            self._play.text = "Pause"

    # ------------------------------------------------------------------ export
    def export(self, *_):
        z = self.current_slice()
        if self.results is None or z not in self.results.tokens:
            notify_error(f"Run AR-Seg on slice {z} first.")
            return None
        try:
            frames = render_progression_frames(self.volume.data[z], self.progression(z),
                                               float(self._threshold.value))
            out = save_progression(self._export_path.value, frames, fps=float(self._fps.value))
        except (OSError, ValueError, RuntimeError) as exc:
            notify_error(f"Export failed: {exc}")
            return None
        self._status.value = f"exported {out}"
        return out
