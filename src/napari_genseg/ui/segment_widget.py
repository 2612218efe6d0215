"""Segment dock widget: run a model over an image layer slice by slice in a worker thread.

The result is a Labels layer on the image's geometry with class names and fixed colours. Each
batch lands in the layer as it arrives (partial results stay when cancelled). A run writes through
``Labels.data_setitem`` inside ``Labels.block_history()``, so the whole run is one undo step and
Ctrl+Z brings back exactly what the layer held before (including the user's own edits).

"3-D clean-up" (on by default; its state when Run is pressed counts): after a run that completed
(not after a cancel or a failure) the checkpoint's declared post-processing
(:mod:`napari_genseg.postprocessing`: the largest 3-D component of single organs, holes filled)
runs on the whole layer and is written inside the same ``block_history``, so one Ctrl+Z undoes the
model's write and the clean-up together. Rule for a run over some slices only: components and holes
are found in the whole layer (what the run wrote plus what the layer already held), but only voxels
on the slices just run can change, and only for the classes the checkpoint declares; every voxel on
the other slices (e.g. painted by the user) stays as it was. The report (volumes in mL, components,
plausibility flags) goes into the layer's run record (``metadata["genseg_run"]["postprocessing"]``,
written to the mask's JSON sidecar), each flag is a warning notification, and the status line shows
the volumes.
"""

from __future__ import annotations

import copy
from pathlib import Path

from magicgui.widgets import (
    CheckBox,
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
from ._run import LayerEdit, add_class_labels, load_model, notify_error, notify_warnings, reports_runtime_errors
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
        self._ctx = None  # (checkpoint, volume, slices, clean-up wanted) of the running run
        self._failed = False
        self._before = (False, None)  # (layer created by the run, its run record before the run)
        self._written = 0  # slices the running run has written
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
                                         "model exports (MSA²Net, MARSeg, AR-Seg encoder/decoder; CPU, fp32), else torch; "
                                         "openvino (napari-genseg[openvino], MSA²Net/MARSeg): f32, or bf16 with "
                                         "precision bf16 where the CPU has native bf16")
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
        self._cleanup = CheckBox(text="3-D clean-up", value=True,
                                 tooltip="after the run: keep the largest 3-D piece of single organs and fill "
                                         "their holes, as declared in the checkpoint; report volumes (mL) and "
                                         "implausible results. A range run changes only the slices it ran.")
        self._run = PushButton(text="Run")
        self._cancel = PushButton(text="Cancel", enabled=False)
        self._progress = ProgressBar(label="progress", min=0, max=100, value=0)
        self._status = Label(value="")
        self.extend([self._image, self._model, self._checkpoint, self._device, self._runtime,
                     self._batch, self._window, self._hu_offset, self._scope, self._start, self._stop,
                     self._cleanup, self._run,
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
                # lazy: the torch model (if the backend needs it) is built in the worker below
                ckpt = load_model(self._model.value, self._checkpoint_path(), lazy=True)
                requested = self._backend.value
                backend = resolve_backend(requested, ckpt.family, self._device.value, self._precision.value)
        except InputError as exc:
            notify_error(exc)
            return None
        notify_warnings(caught)
        vol, report = checked_volume(vol, ckpt, float(self._hu_offset.value))
        existed = {lyr.name for lyr in self.viewer.layers}  # names are unique in a viewer
        self._target = self.target_layer(image, ckpt.family, ckpt.class_names)
        # what a run that fails or is cancelled before its first slice gives back (_on_finished)
        self._before = (self._target.name not in existed, copy.deepcopy(self._target.metadata.get(RUN_KEY)))
        self._written = 0
        self._edit = LayerEdit(self._target).begin()
        device, precision, batch = self._device.value, self._precision.value, int(self._batch.value)
        self._target.metadata[RUN_KEY] = {
            "model": model_record(ckpt),
            "inference": inference_record(ckpt, device, precision, None, batch, zs, backend=backend,
                                          backend_requested=requested),
            "input_checks": report.to_dict(),
            "warnings": [*vol.meta.get("warnings", []), *report.warnings],
        }
        self._ctx = (ckpt, vol, list(zs), bool(self._cleanup.value))
        self._failed = False

        # errors reach _on_error (notify_error); without ignore_errors napari would also re-raise them
        @thread_worker(start_thread=False, ignore_errors=True)
        @reports_runtime_errors
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
        self._written += len(p.z)
        self._progress.value = int(round(100 * p.fraction))
        self._status.value = f"{p.done}/{p.total} slices, {p.done / max(p.elapsed, 1e-9):.1f} slices/s"

    def _on_error(self, exc):
        self._failed = True
        self._status.value = f"failed: {exc}"
        notify_error(exc, "Segmentation failed")

    def _on_finished(self):
        worker = self.worker
        aborted = worker is not None and getattr(worker, "abort_requested", False)
        summary = ""
        if self._edit is not None:
            edit, self._edit = self._edit, None
            try:
                if not aborted and not self._failed and self._ctx is not None:
                    summary = self._clean_up(edit)
                elif self._ctx is not None and isinstance(edit.layer.metadata.get(RUN_KEY), dict):
                    from ..postprocessing import disabled_record

                    why = "cancelled" if aborted else "failed"
                    edit.layer.metadata[RUN_KEY]["postprocessing"] = disabled_record(
                        self._ctx[0].postprocess, f"not run: the model run was {why} (partial result kept raw)")
            finally:
                edit.end()  # the clean-up is part of the run's one undo step
            if (aborted or self._failed) and not self._written:
                self._give_back(edit.layer)
        self._ctx = None
        self.worker = None
        self._run.enabled = True
        self._cancel.enabled = False
        if worker is not None and getattr(worker, "abort_requested", False):
            self._status.value = f"cancelled; {self._status.value.split(',')[0]} kept (Ctrl+Z undoes the run)"
        elif not self._status.value.startswith("failed"):
            self._progress.value = 100
            self._status.value = f"done{': ' + summary if summary else ''} (Ctrl+Z undoes the run)"

    def _give_back(self, layer) -> None:
        """After a run that failed or was cancelled before writing a slice (e.g. weights that
        cannot be read, an export that fails): the layer's run record as before the run, and a
        layer this run created removed, so nothing claims a run that never happened."""
        created, record = self._before
        if created and layer in self.viewer.layers:
            self.viewer.layers.remove(layer)
            return
        if record is None:
            layer.metadata.pop(RUN_KEY, None)
        else:
            layer.metadata[RUN_KEY] = record

    def _clean_up(self, edit) -> str:
        """Post-process the target layer after a completed run (module doc: the rule for a range
        run), inside the open edit. Returns the volumes for the status line ("" when off)."""
        import numpy as np

        from ..postprocessing import disabled_record, postprocess

        ckpt, vol, zs, wanted = self._ctx
        record = edit.layer.metadata.get(RUN_KEY)
        if not wanted:
            if isinstance(record, dict):
                record["postprocessing"] = disabled_record(ckpt.postprocess,
                                                           "switched off ('3-D clean-up' unchecked)")
            return ""
        labels = np.asarray(edit.layer.data)
        new, rep = postprocess(labels, ckpt.class_names, ckpt.postprocess, vol, editable_slices=zs)
        changed = np.nonzero((new != labels).any(axis=(1, 2)))[0]
        if changed.size:
            edit.set_slices(changed, new[changed])
        if isinstance(record, dict):
            record["postprocessing"] = rep.to_dict()
            record["warnings"] = [*record.get("warnings", []), *rep.warnings]
        for w in rep.warnings:
            _notify_warning(w)
        return ", ".join(f"{c.name} {c.volume_ml:.1f} mL" for c in rep.classes if c.voxels)

    def cancel(self, *_):
        if self.worker is not None:
            self._status.value = self._status.value + " (cancelling)"
            self.worker.quit()


def _notify_warning(msg: str) -> None:
    from napari.utils.notifications import show_warning

    show_warning(msg)
