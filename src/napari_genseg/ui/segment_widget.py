"""Segment dock widget: run a model over an image layer slice by slice in a worker thread.

The result is a Labels layer on the image's geometry with class names and fixed colours. Each
batch lands in the layer as it arrives (partial results stay when cancelled). A run writes through
``Labels.data_setitem`` inside ``Labels.block_history()``, so the whole run is one undo step and
Ctrl+Z brings back exactly what the layer held before (including the user's own edits).
"""

from __future__ import annotations

from pathlib import Path

from magicgui.widgets import (
    ComboBox,
    Container,
    FileEdit,
    FloatSpinBox,
    Label,
    ProgressBar,
    PushButton,
    RadioButtons,
    SpinBox,
    create_widget,
)

from ..device import PRECISIONS
from ..engine import parse_slices, run_volume
from ..errors import InputError
from ..models import registry
from ..predictors import BACKENDS, make_predictor, resolve_backend
from ..preprocessing import WINDOW_PRESETS, window_limits
from ..run_record import RUN_KEY, inference_record, model_record
from ._checks import checked_volume
from ._run import LayerEdit, add_class_labels, load_model, notify_error, notify_warnings
from .layers import volume_from_layer

__all__ = ["SegmentWidget"]


class SegmentWidget(Container):
    """Image layer, model + checkpoint, device, precision, batch size, window, slices, Run/Cancel."""

    def __init__(self, napari_viewer, families: tuple[str, ...] | None = None):
        super().__init__(labels=True)
        import napari

        self.viewer = napari_viewer
        self.worker = None
        self._edit = None
        self._target = None
        self._image = create_widget(annotation=napari.layers.Image, label="image")
        fams = [f.name for f in registry.list_families() if families is None or f.name in families]
        configs = [e.name for e in registry.list_configs() if e.family in fams]
        self._model = ComboBox(label="model", choices=fams + configs,
                               tooltip="a family uses its shipped demo weights; a config needs a checkpoint")
        if fams:
            self._model.value = fams[0]
        self._checkpoint = FileEdit(label="checkpoint", mode="r", filter="*.safetensors",
                                    tooltip="empty = the model's shipped demo checkpoint")
        self._device = ComboBox(label="device", choices=["auto", "cpu", "cuda", "mps"], value="auto")
        self._precision = ComboBox(label="precision", choices=list(PRECISIONS), value="auto",
                                   tooltip="auto: fp32 on CPU, bf16/fp16 autocast on GPU; bf16 on a CPU only "
                                           "where it has native bf16 (else fp32, with a warning)")
        self._backend = ComboBox(label="backend", choices=list(BACKENDS), value="auto",
                                 tooltip="auto: ONNX Runtime when installed (napari-genseg[onnx]) and the "
                                         "model exports (MSA²Net, MARSeg, AR-Seg encoder/decoder; CPU, fp32), else torch")
        # one row for both (the dock must fit a 1000 px screen beside the AR-Seg explorer)
        self._runtime = Container(layout="horizontal", labels=False, label="precision, backend",
                                  widgets=[self._precision, self._backend])
        self._runtime.margins = (0, 0, 0, 0)
        self._batch = SpinBox(label="batch size", min=1, max=128, value=4)
        self._window = ComboBox(label="window", choices=list(WINDOW_PRESETS), value="abdomen")
        self._hu_offset = FloatSpinBox(label="HU offset", min=-4096, max=4096, step=1, value=0,
                                       tooltip="added to every voxel before the model (e.g. -1024 when the "
                                               "input check says the values are stored without the offset)")
        self._scope = RadioButtons(label="slices", choices=["all", "current", "range"], value="all",
                                   orientation="horizontal")
        self._start = SpinBox(label="from slice", min=0, max=100000, value=0, visible=False)
        self._stop = SpinBox(label="to slice (incl.)", min=0, max=100000, value=0, visible=False)
        self._run = PushButton(text="Run")
        self._cancel = PushButton(text="Cancel", enabled=False)
        self._progress = ProgressBar(label="progress", min=0, max=100, value=0)
        self._status = Label(value="")
        self.extend([self._image, self._model, self._checkpoint, self._device, self._runtime,
                     self._batch, self._window, self._hu_offset, self._scope, self._start, self._stop, self._run,
                     self._cancel, self._progress, self._status])
        self._run.changed.connect(self.run)
        self._cancel.changed.connect(self.cancel)
        self._window.changed.connect(self._apply_window)
        self._scope.changed.connect(self._on_scope)
        self._image.changed.connect(self._on_image)
        self.viewer.layers.events.inserted.connect(lambda e: self._image.reset_choices())
        self.viewer.layers.events.removed.connect(lambda e: self._image.reset_choices())
        self._on_image()

    # ------------------------------------------------------------------ controls
    def _on_scope(self, *_):
        rng = self._scope.value == "range"
        self._start.visible = rng
        self._stop.visible = rng

    def _on_image(self, *_):
        layer = self._image.value
        if layer is not None and layer.data.ndim == 3:
            n = layer.data.shape[0]
            self._start.max = self._stop.max = n - 1
            self._stop.value = n - 1

    def _apply_window(self, *_):
        layer = self._image.value
        if layer is not None:
            layer.contrast_limits = window_limits(self._window.value)

    def _checkpoint_path(self) -> str | None:
        v = self._checkpoint.value
        if v is None or str(v) in ("", ".") or Path(v).is_dir():
            return None
        return str(v)

    def _slice_spec(self, layer):
        scope = self._scope.value
        if scope == "all":
            return None, None
        if scope == "current":
            current = int(round(layer.world_to_data(self.viewer.dims.point)[0]))
            return "current", current
        if self._stop.value < self._start.value:
            raise ValueError(f"empty slice range {self._start.value}..{self._stop.value}")
        return (int(self._start.value), int(self._stop.value) + 1), None

    # ------------------------------------------------------------------ run
    def target_layer(self, image, family: str, class_names: list[str]):
        """The Labels layer this run writes into (re-used when it exists for this image+model)."""
        return add_class_labels(self.viewer, image, f"{image.name} [{family}]", class_names)

    def run(self, *_):
        """Start a run (returns the worker, or None when the input was refused).

        Refused input (no image, a 2-D layer, an empty slice range, an unusable checkpoint) is one
        notification line; a checkpoint's warnings (e.g. untrained modules) are notifications too.
        """
        import warnings

        from napari.qt.threading import thread_worker

        if self.worker is not None:
            return None
        image = self._image.value
        if image is None:
            notify_error("Choose an image layer first (open a CT: File > Open).")
            return None
        try:  # the dock's own options: these only parse and range-check
            vol = volume_from_layer(image.data, image.metadata, image.scale, image.translate)
            spec, current = self._slice_spec(image)
            zs = parse_slices(spec, vol.shape[0], current)
        except ValueError as exc:
            notify_error(str(exc))
            return None
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                ckpt = load_model(self._model.value, self._checkpoint_path())
                requested = self._backend.value
                backend = resolve_backend(requested, ckpt.family, self._device.value, self._precision.value)
        except InputError as exc:
            notify_error(exc)
            return None
        notify_warnings(caught)
        vol, report = checked_volume(vol, ckpt, float(self._hu_offset.value))
        self._target = self.target_layer(image, ckpt.family, ckpt.class_names)
        self._edit = LayerEdit(self._target).begin()
        device, precision, batch = self._device.value, self._precision.value, int(self._batch.value)
        self._target.metadata[RUN_KEY] = {
            "model": model_record(ckpt),
            "inference": inference_record(ckpt, device, precision, None, batch, zs, backend=backend,
                                          backend_requested=requested),
            "input_checks": report.to_dict(),
            "warnings": [*vol.meta.get("warnings", []), *report.warnings],
        }

        # errors reach _on_error (notify_error); without ignore_errors napari would also re-raise them
        @thread_worker(start_thread=False, ignore_errors=True)
        def work():
            pred = make_predictor(ckpt, device=device, precision=precision, backend=requested)
            return (yield from run_volume(pred, vol, zs, batch_size=batch))

        self.worker = work()
        self.worker.yielded.connect(self._on_progress)
        self.worker.errored.connect(self._on_error)
        self.worker.finished.connect(self._on_finished)
        self._run.enabled = False
        self._cancel.enabled = True
        self._progress.value = 0
        self._status.value = f"running {ckpt.config_name} on {len(zs)} slice(s)..."
        self.worker.start()
        return self.worker

    def _on_progress(self, p):
        if self._edit is None:
            return
        self._edit.set_slices(p.z, p.outputs["labels"])
        self._progress.value = int(round(100 * p.fraction))
        self._status.value = f"{p.done}/{p.total} slices, {p.done / max(p.elapsed, 1e-9):.1f} slices/s"

    def _on_error(self, exc):
        self._status.value = f"failed: {exc}"
        notify_error(exc, "Segmentation failed")

    def _on_finished(self):
        if self._edit is not None:
            edit, self._edit = self._edit, None
            edit.end()
        worker, self.worker = self.worker, None
        self._run.enabled = True
        self._cancel.enabled = False
        if worker is not None and getattr(worker, "abort_requested", False):
            self._status.value = f"cancelled; {self._status.value.split(',')[0]} kept (Ctrl+Z undoes the run)"
        elif not self._status.value.startswith("failed"):
            self._progress.value = 100
            self._status.value = "done (Ctrl+Z undoes the run)"

    def cancel(self, *_):
        if self.worker is not None:
            self._status.value = self._status.value + " (cancelling)"
            self.worker.quit()
