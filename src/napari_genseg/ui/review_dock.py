"""Review dock: lead the reader to the slices that need a human, keep every edit, save with a log.

Pick the image, the mask (a Labels layer: the model's result or any mask) and optionally a
reference Labels layer. Then:

* **Compute uncertainty** (worker thread): K test-time views of a segmentation model (MSA²Net,
  MARSeg: ``predictors.tta``) or N AR-Seg samples give per-class votes; the ``<mask> uncertainty``
  Image layer shows the % of predictions disagreeing with the mask shown (recomputed after edits).
  An empty mask is filled with the model's un-augmented result (one undo step).
* **Queue** (``review.queue``): slices along the chosen axis ranked by uncertainty, area jumps,
  small 2-D pieces, disagreement with the reference and external flags (:meth:`ReviewDock.set_flags`,
  or ``{slice: reason}`` under :data:`FLAGS_KEY` in the mask layer's metadata: the hook for the
  post-processing plausibility checks), and **model agreement per class**: where other models'
  results on the same image (Labels layers with a run record, e.g. from the Segment dock) differ
  from the mask about a class (matched by name), one layer per class, ``<mask> models disagree:
  <class>`` in that class's colour (% of the models that know the class); the queue's "why"
  names the classes. After edits the queue is recomputed in a worker thread on a copy of the
  mask (``refresh_later``): painting never waits for it. Click a row to go there; Previous /
  Next (Shift-B / Shift-N: Next skips reviewed slices), Accept (Shift-A), Flag (Shift-F).
  Painting a slice marks it edited. The progress line counts reviewed slices per class.
* **Re-run model on this slice** (axial): never changes voxels the reader painted nor slices the
  reader accepted (the protection mask); one undo step.
* **Metrics**: against the reference, Dice / IoU / HD95 (mm) per class for the volume and, next
  to them, for the slice shown (2-D, along the review axis); without one, per-class volume (mL)
  and HU mean ± SD, also for the volume and the slice shown. Updated after edits (debounced,
  worker thread: every slice is computed, moving through slices only redraws). The CSV holds the
  volume and every slice.
* **Save**: NIfTI on the source geometry + ``<name>.review.json`` (``review.log``).
* **Add to training set**: image + corrected mask as a case of a Decathlon-layout folder that
  ``genseg train --data msd:FOLDER`` reads (``review.training_export``: never duplicated, patient
  identifiers stripped unless unticked).
* **Autosave** (``review.autosave``): mask, review state and protection mask every N edits or
  S seconds into the autosave folder; offered back when the same image (content hash) is reviewed
  again. Closing napari's window with unsaved review work asks: Save / Discard (the autosave
  stays on disk) / Cancel.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import numpy as np
from magicgui.widgets import (
    CheckBox,
    ComboBox,
    Container,
    FileEdit,
    Label,
    LineEdit,
    ProgressBar,
    PushButton,
    SpinBox,
    Table,
    create_widget,
)

from ..errors import InputError, one_line
from ..models import registry
from ..review.autosave import Autosaver, default_autosave_dir, find_autosave, image_key, load_autosave
from ..review.log import review_record, save_review
from ..review.queue import ReviewState, rank_slices
from ..review.report import (
    CSV_SCOPE_COLUMNS,
    METRIC_COLUMNS,
    STAT_COLUMNS,
    metric_csv_rows,
    slice_metrics,
    slice_stats,
    volume_metrics,
    volume_stats,
    write_csv,
)
from ..review.uncertainty import VoteVolume, class_model_disagreement, votes_from_result
from ..run_record import RUN_KEY
from ._run import LayerEdit, load_model, notify_error, reports_runtime_errors
from .layers import volume_from_layer

__all__ = ["ReviewDock", "FLAGS_KEY", "SHORTCUTS", "painted_indices"]

#: mask layer metadata key for external per-slice flags {slice index: reason} (plausibility checks)
FLAGS_KEY = "genseg_slice_flags"
#: keyboard shortcuts (viewer-wide)
SHORTCUTS = {"next": "Shift-N", "previous": "Shift-B", "accept": "Shift-A", "flag": "Shift-F"}
_AXES = [("axial (axis 0)", 0), ("coronal (axis 1)", 1), ("sagittal (axis 2)", 2)]


def painted_indices(atom, shape) -> tuple[np.ndarray, ...] | None:
    """The voxel indices one napari Labels history atom changed: a fancy-index triple
    ``(indices, old, new)`` or a masked atom (``slice_key``, ``mask``); None when unknown."""
    if hasattr(atom, "slice_key"):
        bounds = [(int(sl), int(sl) + 1) if isinstance(sl, (int, np.integer)) else sl.indices(n)[:2]
                  for sl, n in zip(atom.slice_key, shape)]
        box = tuple(b - a for a, b in bounds)
        local = np.nonzero(np.ones(box, bool) if atom.mask is None else np.reshape(atom.mask, box))
        return tuple(np.asarray(ix) + a for ix, (a, _) in zip(local, bounds))
    try:
        idx = atom[0]
        return tuple(np.asarray(i).ravel() for i in idx)
    except (TypeError, IndexError):
        return None


def painted_classes(atom) -> set[int]:
    """Label ids one napari Labels history atom removed or painted (its old and new values, 0 dropped)."""
    if hasattr(atom, "old_values"):
        old, new = atom.old_values, atom.new_value
    else:
        try:
            _, old, new = atom
        except (TypeError, ValueError):
            return set()
    vals = set(np.unique(np.asarray(old)).tolist()) | set(np.unique(np.asarray(new)).tolist())
    return {int(v) for v in vals} - {0}


def _table(rows: list, columns: list) -> dict:
    """A magicgui Table value in its "split" form (rows, row index, column names)."""
    return {"data": rows, "index": list(range(len(rows))), "columns": list(columns)}


def _segmentation_models() -> list[str]:
    from ..predictors import ArSegPredictor, SegmentationPredictor, predictor_class

    fams = []
    for f in registry.list_families():
        try:
            cls = predictor_class(f.name)
        except KeyError:
            continue
        if issubclass(cls, (SegmentationPredictor, ArSegPredictor)):
            fams.append(f.name)
    return fams + [e.name for e in registry.list_configs() if e.family in fams]


class ReviewDock(Container):
    """The Review dock (see the module docstring)."""

    def __init__(self, napari_viewer):
        super().__init__(labels=True)
        import napari
        from qtpy.QtCore import QTimer
        from qtpy.QtWidgets import QTabWidget

        self.viewer = napari_viewer
        self.worker = None
        self.metrics_worker = None
        self.refresh_worker = None  # the queue update after edits (refresh_later)
        self._refresh_pending = False
        self._refresh_gen = 0  # bumped by every refresh: an older worker's result is not shown
        self.closed = False  # the dock's widgets are gone: late worker results are dropped
        self._metrics_for = None  # what the metric rows shown were computed on (_metrics_key)
        self.state: ReviewState | None = None
        self.votes: VoteVolume | None = None
        self.protect: np.ndarray | None = None
        self.edited_classes: set[int] = set()  # label ids painted or erased in this review
        self.last_seg: Path | None = None  # the DICOM SEG the last Save wrote
        self.items = []
        self.flags: dict[int, str] = {}
        self.metric_rows: list[dict] = []  # volume rows
        self.slice_metric_rows: dict[int, list[dict]] = {}  # slice index (review axis) -> rows
        self._metrics_pending = False
        self.metric_kind = "stats"
        self.autosaver: Autosaver | None = None
        self.key: str | None = None
        self._bound = None  # the mask layer whose paint events we follow
        self._writing = False
        self._model_info: dict | None = None
        self._agreement_layers: set[str] = set()  # the per-class model agreement layers shown
        self._offered = None
        self.dirty = False  # review work since the last Save

        # ---- always visible: what is reviewed
        self._image = create_widget(annotation=napari.layers.Image, label="image")
        self._mask = create_widget(annotation=napari.layers.Labels, label="mask")
        self._reference = create_widget(annotation=Optional[napari.layers.Labels], label="reference",
                                        options={"tooltip": "optional: a reference mask on the same grid"})
        self._axis = ComboBox(label="slices along", choices=_AXES, value=0)

        # ---- Queue tab
        models = _segmentation_models()
        self._model = ComboBox(label="model", choices=models, value=models[0] if models else None,
                               tooltip="a family uses its shipped demo weights; a config needs a checkpoint")
        self._checkpoint = FileEdit(label="checkpoint", mode="r", filter="*.safetensors",
                                    tooltip="empty = the model's shipped demo checkpoint")
        self._device = ComboBox(label="device", choices=["auto", "cpu", "cuda", "mps"], value="auto")
        self._views = SpinBox(label="views K", min=1, max=8, value=4,
                              tooltip="TTA views (shifts, scales, HU jitter; no flips) or AR-Seg samples")
        self._compute = PushButton(text="Compute uncertainty")
        self._cancel = PushButton(text="Cancel", enabled=False)
        run_row = Container(widgets=[self._compute, self._cancel], layout="horizontal", labels=False)
        run_row.margins = (0, 0, 0, 0)
        self._run_progress = ProgressBar(min=0, max=100, value=0, label="uncertainty")
        self._queue = Table(value=_table([], ["slice", "score", "status", "why"]), label="queue")
        self._prev = PushButton(text=f"◀ Previous ({SHORTCUTS['previous']})")
        self._next = PushButton(text=f"Next ▶ ({SHORTCUTS['next']})")
        self._accept = PushButton(text=f"Accept ({SHORTCUTS['accept']})")
        self._flag = PushButton(text=f"Flag ({SHORTCUTS['flag']})")
        nav = Container(widgets=[self._prev, self._next, self._accept, self._flag], layout="horizontal",
                        labels=False)
        nav.margins = (0, 0, 0, 0)
        self._rerun = PushButton(text="Re-run model on this slice (keeps painted voxels, accepted slices)")
        self._progress_line = Label(value="")
        self._progress_line.native.setWordWrap(True)
        self._metrics = Table(value=_table([], list(STAT_COLUMNS)), label="metrics")
        self._update_metrics = PushButton(text="Update metrics")
        self._export = PushButton(text="Export CSV")
        metric_row = Container(widgets=[self._update_metrics, self._export], layout="horizontal", labels=False)
        metric_row.margins = (0, 0, 0, 0)
        review_tab = Container(widgets=[run_row, self._run_progress, self._progress_line, self._queue, nav,
                                        self._rerun, self._metrics, metric_row])
        # ---- Model tab: what "Compute uncertainty" and "Re-run" use
        self._ref_file = FileEdit(label="reference file", mode="r", filter="*.nii.gz *.nii *.dcm",
                                  tooltip="a label NIfTI; resampled onto the image grid when its grid differs")
        self._ref_map = LineEdit(label="label map", value="",
                                 tooltip='file id -> class id, e.g. "5:1,1:2" (TotalSegmentator liver, spleen); '
                                         "empty = ids as they are")
        self._load_ref = PushButton(text="Load reference")
        model_tab = Container(widgets=[self._model, self._checkpoint, self._device, self._views, self._ref_file,
                                       self._ref_map, self._load_ref])
        # ---- Save tab
        self._reader = LineEdit(label="reader", value="", tooltip="your name, recorded in the review log")
        self._output = FileEdit(label="save as", mode="w", filter="*.nii.gz *.nii", value="reviewed_mask.nii.gz")
        self._save = PushButton(text="Save mask + review log")
        self._csv_path = FileEdit(label="metrics CSV", mode="w", filter="*.csv", value="review_metrics.csv")
        self._autosave_dir = FileEdit(label="autosave folder", mode="d", value=str(default_autosave_dir()))
        self._every_edits = SpinBox(label="autosave every N edits", min=1, max=1000, value=10)
        self._every_seconds = SpinBox(label="or S seconds", min=5, max=3600, value=60)
        self._train_dir = FileEdit(label="training folder", mode="d", value="",
                                   tooltip="a Decathlon-layout folder (imagesTr, labelsTr, dataset.json) for genseg train")
        self._strip = CheckBox(text="strip patient identifiers (case named by content hash)", value=True)
        self._add_train = PushButton(text="Add to training set")
        save_tab = Container(widgets=[self._reader, self._output, self._save, self._csv_path, self._autosave_dir,
                                      self._every_edits, self._every_seconds, self._train_dir, self._strip,
                                      self._add_train])
        self._tab_containers = (review_tab, model_tab, save_tab)
        self._tabs = QTabWidget()
        for tab, title in zip(self._tab_containers, ("Review", "Model / reference", "Save")):
            self._tabs.addTab(tab.native, title)
        # ---- an autosave of this image, when there is one
        self._restore_info = Label(value="")
        self._restore_info.native.setWordWrap(True)
        self._restore = PushButton(text="Restore autosave", visible=False)
        self._status = Label(value="")
        self._status.native.setWordWrap(True)
        self.extend([self._image, self._mask, self._reference, self._axis, self._restore_info, self._restore,
                     self._status])
        self.native.layout().insertWidget(6, self._tabs)

        # ---- timers: debounced refresh after edits, metrics, periodic autosave check
        self._refresh_timer = QTimer(self.native)  # dies with the dock
        self._refresh_timer.setSingleShot(True)
        self._refresh_timer.setInterval(400)
        self._refresh_timer.timeout.connect(self.refresh_later)
        self._metrics_timer = QTimer(self.native)  # dies with the dock
        self._metrics_timer.setSingleShot(True)
        self._metrics_timer.setInterval(1500)
        self._metrics_timer.timeout.connect(self.update_metrics)
        self._autosave_timer = QTimer(self.native)  # dies with the dock
        self._autosave_timer.setInterval(5000)
        self._autosave_timer.timeout.connect(self._autosave_tick)
        self._autosave_timer.start()

        self._compute.changed.connect(self.compute_uncertainty)
        self._cancel.changed.connect(self.cancel)
        self._prev.changed.connect(self.previous)
        self._next.changed.connect(self.next)
        self._accept.changed.connect(self.accept)
        self._flag.changed.connect(self.flag)
        self._rerun.changed.connect(self.rerun_slice)
        self._update_metrics.changed.connect(self.update_metrics)
        self._export.changed.connect(lambda *_: self.export_csv())
        self._save.changed.connect(lambda *_: self.save())
        self._add_train.changed.connect(lambda *_: self.add_to_training_set())
        self._load_ref.changed.connect(lambda *_: self.load_reference())
        self._restore.changed.connect(lambda *_: self.restore_autosave())
        self._queue.native.cellClicked.connect(lambda row, col: self.go_to_row(row))
        from qtpy.QtWidgets import QStyledItemDelegate

        for t in (self._queue, self._metrics):
            t.native.setItemDelegate(QStyledItemDelegate(t.native))  # numbers as given, not 4 decimals
            t.native.verticalHeader().setVisible(False)
            t.read_only = True
        self._queue.native.setMinimumHeight(260)
        self._queue.native.setSelectionBehavior(self._queue.native.SelectionBehavior.SelectRows)
        self._metrics.native.setMaximumHeight(170)
        for w in (self._image, self._mask, self._axis):
            w.changed.connect(self._on_target)
        self._reference.changed.connect(lambda *_: self._schedule(metrics=True))
        self._autosave_dir.changed.connect(lambda *_: self._on_target())
        self._every_edits.changed.connect(self._apply_autosave_settings)
        self._every_seconds.changed.connect(self._apply_autosave_settings)
        self.viewer.layers.events.inserted.connect(self._on_layers_changed)
        self.viewer.dims.events.current_step.connect(self._on_slice_changed)
        self.viewer.layers.events.removed.connect(self._on_layers_changed)
        self._bind_keys()
        self._install_close_guard()
        self.native.destroyed.connect(self._teardown)
        self._on_target()

    def _install_close_guard(self):
        """Closing napari's window (quitting closes it) with unsaved review work asks first
        (:meth:`confirm_close`); a window that is not shown is autosaved without asking."""
        from qtpy.QtCore import QEvent, QObject

        dock = self

        class _CloseGuard(QObject):
            def __init__(self):
                super().__init__()
                self.watching = 0  # id of the top-level window watched (no reference kept)

            def eventFilter(self, obj, event):  # noqa: N802 (Qt name)
                kind = event.type()
                if kind == QEvent.Type.Close:
                    if not obj.isVisible():  # nobody to ask (a hidden or never shown window)
                        dock.flush_unsaved()
                    elif not dock.confirm_close():
                        event.ignore()  # Cancel (or a failed Save): the window stays open
                        return True
                elif kind in (QEvent.Type.Show, QEvent.Type.ParentChange):  # docked: watch napari's window
                    top = dock.native.window()
                    if top is not dock.native and id(top) != self.watching:
                        top.installEventFilter(self)
                        self.watching = id(top)
                return False

        self._close_guard = _CloseGuard()
        self.native.installEventFilter(self._close_guard)

    def _teardown(self, *_):
        """The dock's Qt widget is gone (napari closed it): stop listening to the viewer; results of
        workers still running are dropped when they arrive."""
        self.closed = True
        for t in (self._refresh_timer, self._metrics_timer, self._autosave_timer):
            try:
                t.stop()
            except RuntimeError:
                pass
        for ev in (self.viewer.layers.events.inserted, self.viewer.layers.events.removed):
            ev.disconnect(self._on_layers_changed)
        self.viewer.dims.events.current_step.disconnect(self._on_slice_changed)
        if self._bound is not None:
            self._bound.events.paint.disconnect(self._on_paint)
            self._bound = None

    def ask_unsaved(self) -> str:
        """Ask the reader what to do with unsaved review work: "save", "discard" or "cancel"
        (a Save / Discard / Cancel ``QMessageBox``; Escape = Cancel)."""
        from qtpy.QtWidgets import QMessageBox

        B = QMessageBox.StandardButton
        mask = self._bound.name if self._bound is not None else "the mask"
        n = sum(self.state.edits) if self.state is not None else 0
        answer = QMessageBox.question(
            self.native.window(), "Unsaved review work",
            f"The review of {mask} has unsaved work ({n} edits, statuses).\n\n"
            "Save: write the mask and review log (as the Save button does).\n"
            "Discard: close without saving; the autosave stays on disk and is offered "
            "when this image is opened again.\nCancel: keep napari open.",
            B.Save | B.Discard | B.Cancel, B.Save)
        return {B.Save: "save", B.Discard: "discard"}.get(answer, "cancel")

    def confirm_close(self) -> bool:
        """Called when napari's window closes: True lets it close. Without unsaved work: True.
        Otherwise asks (:meth:`ask_unsaved`): Save saves as the Save button does (False when the
        save was refused: the window stays open); Discard writes the autosave (the work stays on
        disk) and closes; Cancel keeps the window open."""
        if not (self.dirty and self.autosaver is not None and self._bound is not None):
            return True
        answer = self.ask_unsaved()
        if answer == "save":
            return self.save() is not None
        if answer == "discard":
            self._autosave(force=True)
            return True
        self._status.value = "close cancelled: the review is still open"
        return False

    def flush_unsaved(self) -> Path | None:
        """Autosave now when there is review work since the last Save (called on close/quit)."""
        if self.dirty and self.autosaver is not None and self._bound is not None:
            return self._autosave(force=True)
        return None

    def _on_layers_changed(self, event=None):
        self.reset_choices()
        lay = getattr(event, "value", None)
        if lay is not None and (getattr(lay, "metadata", None) or {}).get(RUN_KEY):
            self._schedule()  # another model's result: model agreement joins the queue

    def reset_choices(self, *_):
        """napari calls this on docked widgets when layers change: reach the tabs' widgets too."""
        super().reset_choices()
        for tab in getattr(self, "_tab_containers", ()):
            tab.reset_choices()

    # ------------------------------------------------------------------ keys
    def _bind_keys(self):
        actions = {"next": self.next, "previous": self.previous, "accept": self.accept, "flag": self.flag}
        for name, key in SHORTCUTS.items():
            fn = actions[name]
            self.viewer.bind_key(key, lambda _v, fn=fn: fn(), overwrite=True)

    # ------------------------------------------------------------------ target (image, mask, axis)
    @property
    def axis(self) -> int:
        return int(self._axis.value)

    def _volume(self):
        image = self._image.value
        return volume_from_layer(image.data, image.metadata, image.scale, image.translate)

    def _spacing(self):
        image = self._image.value
        if image is not None:
            return self._volume().spacing
        mask = self._mask.value
        return tuple(float(s) for s in mask.scale[-3:])

    def class_names(self) -> list[str]:
        """Label id -> name from the mask layer (its ``class`` feature or the run record)."""
        return self.layer_class_names(self._mask.value)

    @staticmethod
    def layer_class_names(layer) -> list[str]:
        """Label id -> name of a Labels layer (its ``class`` feature or the run record); [] unknown."""
        if layer is None:
            return []
        feats = getattr(layer, "features", None)
        if feats is not None and "class" in getattr(feats, "columns", ()):
            return [str(v) for v in feats["class"]]
        run = (layer.metadata or {}).get(RUN_KEY) or {}
        return list((run.get("model") or {}).get("class_names") or [])

    def _valid_target(self) -> bool:
        image, mask = self._image.value, self._mask.value
        return (image is not None and mask is not None and np.ndim(image.data) == 3
                and tuple(image.data.shape) == tuple(mask.data.shape))

    def _on_target(self, *_):
        """New image / mask / axis: fresh review state and protection, follow the mask's edits,
        look for an autosave of this image."""
        mask = self._mask.value
        self.flush_unsaved()  # the review being left (if any) is autosaved first
        if self._bound is not None and self._bound is not mask:
            self._bound.events.paint.disconnect(self._on_paint)
            self._bound = None
        self.items = []
        image = self._image.value
        if self.votes is not None and (getattr(self, "_votes_for", None) != id(image) or mask is None
                                       or self.votes.shape != tuple(mask.data.shape)):
            self.votes = None  # the uncertainty belongs to the image it was computed on
        if not self._valid_target():
            self.state = self.protect = self.autosaver = None
            self._status.value = ("choose an image and a mask of the same shape"
                                  if self._image.value is not None and mask is not None else "")
            self._fill_queue()
            return
        if self._bound is None:
            mask.events.paint.connect(self._on_paint)
            self._bound = mask
        n = mask.data.shape[self.axis]
        target = (id(mask), self.axis)
        if self.state is None or getattr(self, "_state_for", None) != target or self.state.n_slices != n:
            self.state = ReviewState(n, self.axis)  # a new mask or axis: a new review
            self.dirty = False
        if self.protect is None or getattr(self, "_state_for", (None,))[0] != id(mask) \
                or self.protect.shape != mask.data.shape:
            self.protect = np.zeros(mask.data.shape, bool)
            self.edited_classes = set()  # classes painted or erased: SEMIAUTOMATIC in a DICOM SEG
        self._state_for = target
        self.key = image_key(np.asarray(image.data), self._spacing())
        self.autosaver = Autosaver(self._autosave_folder(), self.key, int(self._every_edits.value),
                                   float(self._every_seconds.value), mask_name=mask.name)
        self._offer_autosave()
        self._fill_queue(progress="")  # the queue of this target follows from a worker
        self.refresh_later()
        self._schedule(metrics=True)

    def _autosave_folder(self) -> Path:
        v = self._autosave_dir.value
        return Path(v) if v and str(v) not in ("", ".") else default_autosave_dir()

    def _apply_autosave_settings(self, *_):
        if self.autosaver is not None:
            self.autosaver.every_edits = int(self._every_edits.value)
            self.autosaver.every_seconds = float(self._every_seconds.value)

    def set_flags(self, flags: dict[int, str] | None) -> None:
        """External per-slice flags ``{slice index along the axis: reason}`` (e.g. plausibility
        checks of the post-processing step) that feed the queue; None clears them."""
        self.flags = {int(k): str(v) for k, v in (flags or {}).items()}
        self.refresh()

    @staticmethod
    def _flags_of(mask: np.ndarray, metadata: dict, axis: int, flags: dict, n: int) -> dict[int, str]:
        """Per-slice flags {slice: reason} from the mask layer's metadata (:data:`FLAGS_KEY`), the
        Segment dock's clean-up report and ``flags`` (:meth:`set_flags`); any thread."""
        out = {int(k): str(v) for k, v in dict(metadata.get(FLAGS_KEY) or {}).items()}
        if axis == 0:
            # the Segment dock's 3-D clean-up report (postprocessing.py): slices that lost stray
            # components, second large components, an organ on the wrong side (axial slices)
            rep = (metadata.get(RUN_KEY) or {}).get("postprocessing")
            if isinstance(rep, dict) and rep.get("enabled"):
                from ..postprocessing import slice_flags

                for z, reasons in slice_flags(mask, rep).items():
                    out[z] = "; ".join([out[z], *reasons] if z in out else reasons)
        out.update(flags)
        return {k: v for k, v in out.items() if 0 <= k < n}

    # ------------------------------------------------------------------ slices and navigation
    def current_slice(self) -> int:
        """The slice index (along the review axis) the viewer shows now."""
        mask = self._mask.value
        if mask is None:
            return 0
        i = int(round(mask.world_to_data(self.viewer.dims.point)[self.axis]))
        return int(np.clip(i, 0, mask.data.shape[self.axis] - 1))

    def go_to(self, index: int) -> None:
        """Show slice ``index`` along the review axis (the viewer's 2-D plane turns to it)."""
        mask = self._mask.value
        if mask is None:
            return
        ax = self.axis
        if self.viewer.dims.ndisplay == 2 and self.viewer.dims.order[0] != ax:
            self.viewer.dims.order = (ax, *[a for a in range(3) if a != ax])
        pt = list(mask.world_to_data(self.viewer.dims.point))
        pt[ax] = int(index)
        world = mask.data_to_world(pt)
        self.viewer.dims.set_point(ax, float(world[ax]))

    def go_to_row(self, row: int) -> None:
        if 0 <= row < len(self.items):
            self.go_to(self.items[row].index)

    def _queue_position(self) -> int | None:
        cur = self.current_slice()
        for k, it in enumerate(self.items):
            if it.index == cur:
                return k
        return None

    def next(self, *_) -> int | None:
        """Go to the next queue item after the current slice that is still untouched (or simply
        the next one when all are reviewed); returns its slice index."""
        if not self.items or self.state is None:
            return None
        pos = self._queue_position()
        start = -1 if pos is None else pos
        rest = self.items[start + 1 :]
        pick = next((it for it in rest if self.state.status[it.index] == "untouched"), rest[0] if rest else None)
        if pick is None:
            self._status.value = "end of the queue"
            return None
        self.go_to(pick.index)
        self._select_row(pick.index)
        return pick.index

    def previous(self, *_) -> int | None:
        """Go to the queue item before the current slice; returns its slice index."""
        if not self.items:
            return None
        pos = self._queue_position()
        if pos is None or pos == 0:
            pick = self.items[0]
        else:
            pick = self.items[pos - 1]
        self.go_to(pick.index)
        self._select_row(pick.index)
        return pick.index

    def _select_row(self, index: int):
        for k, it in enumerate(self.items):
            if it.index == index:
                self._queue.native.selectRow(k)
                return

    def accept(self, *_) -> None:
        """Mark the current slice accepted (a re-run will not touch it)."""
        self._set_status("accepted")

    def flag(self, *_) -> None:
        """Mark the current slice flagged (needs a second look)."""
        self._set_status("flagged")

    def _set_status(self, status: str):
        if self.state is None:
            return
        i = self.current_slice()
        self.state.set_status(i, status)
        self._note_work()
        self._fill_queue()
        if self.refresh_worker is not None:  # its progress line predates this status: computed again
            self._refresh_gen += 1
            self._refresh_pending = True
        self._status.value = f"slice {i}: {status}"

    # ------------------------------------------------------------------ edits
    def _on_paint(self, event):
        """A paint event on the mask: the slices it touched are edited, its voxels protected."""
        if self._writing or self.state is None:
            return
        mask = self._mask.value
        touched = set()
        for atom in event.value or []:
            idx = painted_indices(atom, mask.data.shape)
            if idx is None or len(idx) != 3 or idx[0].size == 0:
                continue
            self.protect[idx] = True
            touched |= {int(v) for v in np.unique(idx[self.axis])}
            self.edited_classes |= painted_classes(atom)
        if touched:
            self.state.mark_edited(sorted(touched))
            self._note_work()
            self._schedule(metrics=True)

    def _note_work(self):
        if self.autosaver is None:
            return
        self.dirty = True
        self.autosaver.note_edit()
        self._autosave(force=False)  # the progress line follows with the queue (refresh)

    def _autosave(self, force: bool) -> Path | None:
        mask = self._bound  # the mask this review state and autosaver belong to
        if self.autosaver is None or self.state is None or mask is None:
            return None
        saver = self.autosaver
        if not (force or saver.due()):
            return None
        try:
            return saver.save(np.asarray(mask.data), self.state.to_dict(), self.protect,
                              class_names=self.class_names())
        except OSError as exc:
            notify_error(f"autosave failed: {exc}")
            return None

    def _autosave_tick(self):
        self._autosave(force=False)

    def autosave_now(self) -> Path | None:
        """Write the autosave now (whatever the N / S rules say)."""
        return self._autosave(force=True)

    def _offer_autosave(self):
        info = find_autosave(self._autosave_folder(), self.key) if self.key else None
        self._restore_info.value = f"Found an {info.describe()}." if info else ""
        self._restore.visible = info is not None
        if info is not None:
            self._status.value = f"this image has an {info.describe()}: press Restore autosave"
        self._offered = info

    @property
    def restore_available(self) -> bool:
        return getattr(self, "_offered", None) is not None

    def restore_autosave(self) -> bool:
        """Put the autosaved mask (one undo step), review state and protection back."""
        info = getattr(self, "_offered", None)
        mask = self._mask.value
        if info is None or mask is None:
            return False
        data, meta = load_autosave(info.path)
        if data.shape != mask.data.shape:
            notify_error(f"the autosave holds a mask of shape {data.shape}, the mask layer is {mask.data.shape}")
            return False
        self._write(mask, np.arange(data.shape[0]), data)
        self.state = ReviewState.from_dict(meta["review"])
        if self.state.n_slices != mask.data.shape[self.state.axis]:
            self.state = ReviewState(mask.data.shape[self.axis], self.axis)
        elif self.state.axis != self.axis:
            self._axis.value = self.state.axis
        prot = meta.get("protect")
        self.protect = prot if prot is not None and prot.shape == data.shape else np.zeros(data.shape, bool)
        self.edited_classes = {int(v) for v in np.unique(data[self.protect])} - {0}  # erased ones unknown
        self._restore.visible = False
        self._restore_info.value = f"restored the {info.describe()}"
        self._status.value = self._restore_info.value
        self._offered = None
        self.refresh_later()
        self._schedule(metrics=True)
        return True

    def _write(self, layer, zs, new):
        """Write slices ``zs`` (axis 0) of ``layer`` as one undo step, not counted as the reader's edit."""
        self._writing = True
        try:
            edit = LayerEdit(layer).begin()
            try:
                edit.set_slices(np.asarray(zs), np.asarray(new))
            finally:
                edit.end()
        finally:
            self._writing = False

    # ------------------------------------------------------------------ queue
    def _schedule(self, metrics: bool = False):
        self._refresh_timer.start()
        if metrics:
            self._metrics_timer.start()

    def refresh(self, *_) -> None:
        """Recompute the uncertainty layer (against the mask shown now), the queue and progress,
        on the calling thread (:meth:`refresh_later` does it in a worker)."""
        self._refresh_gen += 1
        if self.state is None or not self._valid_target():
            self._fill_queue()
            return
        self._refresh_apply(self._refresh_compute(self._refresh_inputs()))

    def refresh_later(self, *_):
        """The refresh after edits (debounced): the whole-volume work (disagreement, ranking, model
        agreement, progress: seconds on a 512² x 150 CT) runs in a worker thread on a copy of the
        mask and only its result is shown on the GUI thread, so painting never waits for it.
        Asked while one runs, it runs again when that one ends; a result for a target no longer
        reviewed, or older than a later refresh, is dropped. Returns the worker (None: none started)."""
        from napari.qt.threading import thread_worker

        if self.state is None or not self._valid_target():
            self.refresh()
            return None
        if self.refresh_worker is not None:
            self._refresh_pending = True
            return None
        self._refresh_pending = False
        self._refresh_gen += 1
        gen, target, inputs = self._refresh_gen, self._target(), self._refresh_inputs()

        @thread_worker(start_thread=False, ignore_errors=True)
        def work():
            return self._refresh_compute(inputs)

        def show(out):
            if self.closed:
                return
            if gen == self._refresh_gen and self._is_target(target):
                self._refresh_apply(out)

        self.refresh_worker = work()
        self.refresh_worker.returned.connect(show)
        self.refresh_worker.errored.connect(lambda exc: notify_error(exc, "Queue update failed"))
        self.refresh_worker.finished.connect(self._on_refresh_finished)
        self.refresh_worker.start()
        return self.refresh_worker

    def _on_refresh_finished(self):
        if self.closed:
            return
        self.refresh_worker = None
        if self._refresh_pending:
            self._refresh_pending = False
            self._refresh_timer.start()

    def _refresh_inputs(self) -> dict:
        """What the queue is computed from, read on the GUI thread: a copy of the mask (the reader
        may paint while a worker computes) and of the review state, the reference, the votes,
        the flags' sources and the other models' layers."""
        layer = self._mask.value
        mask = np.array(layer.data)
        votes = self.votes if self.votes is not None and self.votes.shape == mask.shape else None
        ref_data, _ = self._reference_data(mask.shape)
        others = [(lay.name, np.asarray(lay.data), self.layer_class_names(lay) or None) for lay in self.model_layers()]
        return {"mask": mask, "axis": self.axis, "spacing": self._spacing(), "votes": votes, "reference": ref_data,
                "metadata": dict(layer.metadata or {}), "flags": dict(self.flags), "names": self.class_names(),
                "others": others, "state": ReviewState.from_dict(self.state.to_dict())}

    @classmethod
    def _refresh_compute(cls, inp: dict) -> dict:
        """The queue's whole-volume work (any thread): uncertainty (% disagreeing), model agreement
        per class (``review.uncertainty.class_model_disagreement``: (cd, the models' names) for each
        class in dispute), the ranked slices naming the classes in dispute, the progress line."""
        mask, axis = inp["mask"], inp["axis"]
        dis = unc = None
        if inp["votes"] is not None:
            dis = inp["votes"].disagreement(mask)
            unc = inp["votes"].slice_scores(mask, axis, dis)
        agreement, disputed, models = [], {}, None
        others = inp["others"]
        if others:
            per_class = class_model_disagreement(mask, inp["names"] or None, [(d, n) for _, d, n in others])
            models = np.zeros(mask.shape[axis], np.float32)
            for cd in per_class:
                if not cd.data.any():
                    continue
                agreement.append((cd, [others[k][0] for k in cd.models]))
                sc = cd.slice_scores(mask, axis)
                models = np.maximum(models, sc)
                for i in np.flatnonzero(sc > 0):
                    disputed.setdefault(int(i), []).append((float(sc[i]), cd.name))
        state = inp["state"]
        flags = cls._flags_of(mask, inp["metadata"], axis, inp["flags"], state.n_slices)
        items = rank_slices(mask, axis, inp["spacing"], uncertainty=unc, reference=inp["reference"],
                            flags=flags or None, models=models)
        for it in items:  # name the classes the models disagree about on that slice
            if it.index in disputed:
                names = [n for _, n in sorted(disputed[it.index], key=lambda sn: -sn[0])]
                it.note = "; ".join(filter(None, [it.note, "models disagree on " + ", ".join(names)]))
        return {"disagreement": dis, "agreement": agreement, "items": items,
                "progress": state.progress(mask, inp["names"])}

    def _refresh_apply(self, out: dict) -> None:
        """Show a :meth:`_refresh_compute` result (GUI thread): the uncertainty layer, one
        ``<mask> models disagree: <class>`` layer per class in dispute (stale ones removed), the queue."""
        if out["disagreement"] is not None:
            self._uncertainty_layer(out["disagreement"])
        keep = set()
        for cd, voters in out["agreement"]:
            name = f"{self._mask.value.name} models disagree: {cd.name}"
            self._class_agreement_layer(name, cd, voters)
            keep.add(name)
        for name in self._agreement_layers - keep:
            if name in self.viewer.layers:
                self.viewer.layers.remove(name)
        self._agreement_layers = keep
        self.items = out["items"]
        self._fill_queue(progress=out["progress"])

    def _class_agreement_layer(self, name: str, cd, voters: list[str]):
        """The Image layer of one class's model disagreement (%), transparent at 0 and in the
        class's colour of the mask at 100; metadata names the class and the models."""
        from napari.utils.colormaps import Colormap

        mask = self._mask.value
        meta = {"units": f"% of the other models ({', '.join(voters)}) disagreeing with the mask shown "
                         f"about {cd.name}", "class": cd.name, "class_id": cd.class_id, "models": voters}
        if name in self.viewer.layers and self.viewer.layers[name].data.shape == cd.data.shape:
            lay = self.viewer.layers[name]
            lay.data = cd.data
            lay.metadata.update(meta)
            return lay
        try:
            rgb = [float(v) for v in np.asarray(mask.get_color(cd.class_id), dtype=float).ravel()[:3]]
        except (AttributeError, TypeError, ValueError, KeyError):
            rgb = [1.0, 0.5, 0.0]
        cmap = Colormap(colors=[[*rgb, 0.0], [*rgb, 0.5], [*rgb, 1.0]], name=f"genseg_agreement_{cd.name}",
                        display_name=f"{cd.name} (0 transparent)")
        return self.viewer.add_image(cd.data, name=name, scale=mask.scale, translate=mask.translate,
                                     colormap=cmap, contrast_limits=(0, 100), opacity=0.8,
                                     blending="translucent", metadata=meta)

    def _fill_queue(self, progress: str | None = None):
        st = self.state
        rows = [[it.index, round(it.score, 2), st.status[it.index] if st else "", it.reasons] for it in self.items]
        self._queue.value = _table(rows, ["slice", "score", "status", "why"])
        self._queue.native.resizeColumnsToContents()
        if progress is not None and st is not None:
            self._progress_line.value = progress
        else:
            self._update_progress()

    def _update_progress(self):
        if self.state is None or not self._valid_target():
            self._progress_line.value = ""
            return
        self._progress_line.value = self.state.progress(np.asarray(self._mask.value.data), self.class_names())

    @property
    def progress_text(self) -> str:
        return self._progress_line.value

    def _uncertainty_layer(self, dis: np.ndarray):
        src = self.votes.source if self.votes else "tta"
        what = "TTA views" if src == "tta" else "AR-Seg samples"
        return self._map_layer(f"{self._mask.value.name} uncertainty", dis,
                               f"% of the {what} disagreeing with the mask shown")

    def _map_layer(self, name: str, data: np.ndarray, units: str):
        """An Image layer of percentages over the mask (inferno, 0 transparent), re-used by name."""
        from .arseg_explorer import variability_colormap

        mask = self._mask.value
        if name in self.viewer.layers and self.viewer.layers[name].data.shape == data.shape:
            lay = self.viewer.layers[name]
            lay.data = data
            return lay
        return self.viewer.add_image(
            data, name=name, scale=mask.scale, translate=mask.translate, colormap=variability_colormap(),
            contrast_limits=(0, 100), opacity=0.8, blending="translucent", metadata={"units": units})

    def model_layers(self) -> list:
        """Other models' results on this image: Labels layers of the mask's shape that carry a
        model run record (``run_record.RUN_KEY``), other than the mask and the reference."""
        mask, ref = self._mask.value, self._reference.value
        import napari

        return [lay for lay in self.viewer.layers
                if isinstance(lay, napari.layers.Labels) and lay is not mask and lay is not ref
                and lay.data.shape == mask.data.shape and (lay.metadata or {}).get(RUN_KEY)]

    # ------------------------------------------------------------------ model runs
    def _checkpoint_path(self):
        v = self._checkpoint.value
        if v is None or str(v) in ("", ".") or Path(v).is_dir():
            return None
        return str(v)

    def _load(self):
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return load_model(self._model.value, self._checkpoint_path())

    @staticmethod
    def _predictor(ckpt, uncertainty: bool, k: int, device: str):
        """The predictor a run uses: TTA with ``k`` views (segmentation models) or ``k`` AR-Seg
        samples for uncertainty; the plain predictor for a re-run. Built in the worker thread."""
        from ..predictors import ArSegPredictor, make_predictor, predictor_class
        from ..predictors.tta import TTAPredictor

        if issubclass(predictor_class(ckpt.family), ArSegPredictor):
            return make_predictor(ckpt, device=device, n_samples=max(k, 2) if uncertainty else 8)
        if uncertainty:
            return TTAPredictor.from_checkpoint(ckpt, device=device, views=k)
        return make_predictor(ckpt, device=device)

    def _job_inputs(self):
        """(checkpoint, volume, views, device) for a model run, read on the GUI thread; None (with
        a notification) when the checkpoint is refused."""
        try:
            ckpt = self._load()
        except InputError as exc:
            notify_error(exc)
            return None
        return ckpt, self._volume(), int(self._views.value), str(self._device.value)

    def compute_uncertainty(self, *_):
        """Run the model's K views (or N samples) over the image in a worker; returns the worker
        (None when the input was refused)."""
        from napari.qt.threading import thread_worker

        from ..engine import run_volume

        if self.worker is not None:
            return None
        if not self._valid_target():
            notify_error("Choose an image and a mask layer of the same shape first.")
            return None
        job = self._job_inputs()
        if job is None:
            return None
        ckpt, vol, views, device = job

        @thread_worker(start_thread=False, ignore_errors=True)
        @reports_runtime_errors
        def work():
            pred = self._predictor(ckpt, True, views, device)
            names = [v.name for v in getattr(pred, "views", ())]
            n = getattr(pred, "n", None)
            target = getattr(pred, "target_class", 1)
            result = yield from run_volume(pred, vol, None, batch_size=2)
            src = "tta" if names else "arseg"
            return result, votes_from_result(result, src, names, n=n, target_class=target)

        from ..run_record import model_record

        self._model_info = {"model": model_record(ckpt), "views": views}
        self.worker = work()
        self.worker.yielded.connect(self._on_progress)
        target = self._target()
        self.worker.returned.connect(lambda out: self._on_uncertainty(out, target))
        self.worker.errored.connect(lambda exc: notify_error(exc, "Uncertainty failed"))
        self.worker.finished.connect(self._on_finished)
        self._compute.enabled = False
        self._cancel.enabled = True
        self._run_progress.value = 0
        self._status.value = f"computing uncertainty with {ckpt.config_name} ({views} views)..."
        self.worker.start()
        return self.worker

    def _on_progress(self, p):
        if self.closed:
            return
        self._run_progress.value = int(round(100 * p.fraction))

    def _target(self) -> tuple:
        """(image layer, mask layer, review axis) now: what a worker's result belongs to."""
        return self._image.value, self._mask.value, self.axis

    def _is_target(self, target: tuple) -> bool:
        """True when ``target`` (:meth:`_target` when a worker started) is the same image and mask
        layers (by identity) and review axis as now."""
        now = self._target()
        return all(a is b for a, b in zip(now[:2], target[:2])) and now[2] == target[2]

    def _still_target(self, target: tuple, what: str) -> bool:
        """True when ``target`` (:meth:`_target` when the run started) is still what is reviewed;
        otherwise the run's result is dropped with a status line (it was computed for another
        image or mask: writing it would change a layer the reader is not looking at)."""
        if self.closed:
            return False
        if self._is_target(target):
            return True
        img, mask = (getattr(lay, "name", None) for lay in target[:2])
        self._status.value = (f"{what} finished for {mask} on {img}, which is no longer the image/mask "
                              "under review: result dropped, nothing was changed")
        return False

    def _on_uncertainty(self, out, target: tuple | None = None):
        if self.closed:
            return
        result, votes = out
        if target is not None and not self._still_target(target, "uncertainty"):
            return
        mask = self._mask.value
        if mask is None or votes.shape != mask.data.shape:
            return
        if not np.asarray(mask.data).any() and result.z:  # an empty mask: show the model's result
            self._write(mask, np.asarray(result.z), result.labels[result.z])
            if not mask.metadata.get(RUN_KEY) and self._model_info:
                mask.metadata[RUN_KEY] = {"model": self._model_info["model"]}
        self.votes = votes
        self._votes_for = id(self._image.value)
        self.refresh_later()
        self._schedule(metrics=True)
        self._status.value = (f"uncertainty from {votes.n} {'views' if votes.source == 'tta' else 'samples'} "
                              f"on {len(votes.z)} slices; the queue is ranked")

    def _on_finished(self):
        if self.closed:
            return
        self.worker = None
        self._compute.enabled = True
        self._cancel.enabled = False
        self._run_progress.value = 100

    def cancel(self, *_):
        if self.worker is not None:
            self.worker.quit()

    def rerun_slice(self, *_, index: int | None = None):
        """Re-run the model on one axial slice (the current one by default) in a worker; voxels the
        reader painted and accepted slices are kept (the protection mask). One undo step. Returns
        the worker, or None when refused."""
        from napari.qt.threading import thread_worker

        from ..engine import run_volume

        if self.worker is not None or not self._valid_target() or self.state is None:
            return None
        if self.axis != 0:
            notify_error("Re-run works on axial slices: set 'slices along' to axial.")
            return None
        z = self.current_slice() if index is None else int(index)
        if self.state.status[z] == "accepted":
            self._status.value = f"slice {z} is accepted: the re-run leaves it as it is"
            return None
        job = self._job_inputs()
        if job is None:
            return None
        ckpt, vol, views, device = job

        @thread_worker(start_thread=False, ignore_errors=True)
        @reports_runtime_errors
        def work():
            pred = self._predictor(ckpt, False, views, device)
            return (yield from run_volume(pred, vol, [z], batch_size=1))

        self.worker = work()
        target = self._target()
        self.worker.returned.connect(lambda res: self._still_target(target, f"re-run of slice {z}")
                                     and self._apply_rerun(z, res.labels[z]))
        self.worker.errored.connect(lambda exc: notify_error(exc, "Re-run failed"))
        self.worker.finished.connect(self._on_finished)
        self._compute.enabled = False
        self._status.value = f"re-running the model on slice {z}..."
        self.worker.start()
        return self.worker

    def protection(self) -> np.ndarray:
        """(Z, H, W) bool: voxels a re-run must keep (painted by the reader, or in an accepted slice)."""
        mask = self._mask.value
        prot = self.protect.copy() if self.protect is not None else np.zeros(mask.data.shape, bool)
        if self.state is not None:
            acc = self.state.accepted_slices()
            if acc:
                sl = [slice(None)] * 3
                sl[self.state.axis] = acc
                prot[tuple(sl)] = True
        return prot

    def _apply_rerun(self, z: int, new: np.ndarray):
        mask = self._mask.value
        keep = self.protection()[z]
        old = np.asarray(mask.data[z])
        merged = np.where(keep, old, new).astype(old.dtype)
        self._write(mask, [z], merged[None])
        self._status.value = (f"slice {z} re-run: {int((merged != old).sum())} voxels changed, "
                              f"{int(keep.sum())} protected voxels kept (Ctrl+Z undoes it)")
        self._schedule(metrics=True)

    # ------------------------------------------------------------------ metrics
    def _reference_data(self, mask_shape):
        """(reference voxels or None, why it is not compared or None). A reference that is the
        mask under review itself (every metric would read 1.0) or that has another grid is not
        compared, and the status line says so."""
        ref = self._reference.value
        if ref is None:
            return None, None
        if ref is self._mask.value or ref.data is self._mask.value.data:
            return None, (f"reference '{ref.name}' is the mask under review itself: not compared "
                          "(choose another layer)")
        if tuple(ref.data.shape) != tuple(mask_shape):
            return None, (f"reference '{ref.name}' has shape {tuple(ref.data.shape)}, the mask "
                          f"{tuple(mask_shape)}: not compared")
        return np.array(ref.data), None

    def _metric_inputs(self):
        mask = np.array(self._mask.value.data)
        ref_data, why = self._reference_data(mask.shape)
        if why is not None:
            self._status.value = why
        image = np.asarray(self._image.value.data)
        return mask, ref_data, image, self.class_names(), self._spacing(), self.axis

    @staticmethod
    def _metrics_of(mask, ref_data, image, names, spacing, axis):
        """(kind, volume rows, {slice: rows}) for every slice along ``axis`` (any thread)."""
        if ref_data is not None:
            return ("reference", volume_metrics(mask, ref_data, spacing, names),
                    slice_metrics(mask, ref_data, spacing, names, axis))
        return "stats", volume_stats(mask, image, spacing, names), slice_stats(mask, image, spacing, names, axis)

    @staticmethod
    def _metrics_key(mask, ref_data, image, names, spacing, axis) -> tuple:
        """What metric rows depend on: SHA-1 of the mask's and the reference's voxels (~0.05 s for
        a 512² x 150 mask, against seconds for the metrics), the image array (its identity and
        shape: an image is not edited), class names, spacing and axis."""
        import hashlib

        def digest(a):
            return None if a is None else (a.shape, str(a.dtype), hashlib.sha1(np.ascontiguousarray(a)).hexdigest())

        return (digest(mask), digest(ref_data), id(image), image.shape, tuple(names), tuple(spacing), axis)

    def compute_metrics(self, per_slice: bool = False):
        """("reference", Dice/IoU/HD95 rows) against the reference layer, or ("stats", volume and
        HU rows) without one (see ``review.report``), for the volume; with ``per_slice`` a third
        item, ``{slice index along the review axis: rows}`` for every slice. The rows the metrics
        worker computed are re-used when the mask, reference, image, names and axis are still
        those they were computed on (HD95 of a 512² x 150 volume takes seconds: Save and Export
        CSV do not freeze the window for it again); otherwise computed on the calling thread."""
        inputs = self._metric_inputs()
        key = self._metrics_key(*inputs)
        if key == self._metrics_for:
            return ((self.metric_kind, self.metric_rows, self.slice_metric_rows) if per_slice
                    else (self.metric_kind, self.metric_rows))
        mask, ref_data, image, names, spacing, axis = inputs
        if per_slice:
            out = self._metrics_of(*inputs)
            self._show_metrics(out, key)
            return out
        if ref_data is not None:
            return "reference", volume_metrics(mask, ref_data, spacing, names)
        return "stats", volume_stats(mask, image, spacing, names)

    def update_metrics(self, *_):
        """Recompute the metrics table (volume and every slice) in a worker thread (returns it;
        None when nothing to do). Asked while one runs, it runs again when that one ends."""
        from napari.qt.threading import thread_worker

        if not self._valid_target():
            return None
        if self.metrics_worker is not None:
            self._metrics_pending = True
            return None
        inputs = self._metric_inputs()  # the mask copied on the GUI thread; hashed in the worker
        self._metrics_pending = False

        @thread_worker(start_thread=False, ignore_errors=True)
        def work():
            return self._metrics_key(*inputs), self._metrics_of(*inputs)

        self.metrics_worker = work()
        self.metrics_worker.returned.connect(lambda out: self._show_metrics(out[1], out[0]))
        self.metrics_worker.errored.connect(lambda exc: notify_error(exc, "Metrics failed"))
        self.metrics_worker.finished.connect(self._on_metrics_finished)
        self.metrics_worker.start()
        return self.metrics_worker

    def _on_metrics_finished(self):
        if self.closed:
            return
        self.metrics_worker = None
        if self._metrics_pending:
            self._metrics_pending = False
            self._metrics_timer.start()

    def _on_slice_changed(self, *_):
        if self.slice_metric_rows or self.metric_rows:
            self._draw_metrics()

    def _show_metrics(self, out, key: tuple | None = None):
        """Show metric rows (volume, and per slice when ``out`` has them); ``key``: what they were
        computed on (:meth:`_metrics_key`), for :meth:`compute_metrics` to re-use them."""
        if self.closed:
            return
        kind, rows, *rest = out
        self.metric_kind, self.metric_rows = kind, rows
        self.slice_metric_rows = rest[0] if rest and rest[0] is not None else {}
        self._metrics_for = key if rest and rest[0] is not None else None
        self._draw_metrics()

    def _draw_metrics(self):
        """The table: one row per class, the volume's values and, next to them, the slice shown."""
        kind, rows = self.metric_kind, self.metric_rows
        z = self.current_slice()
        here = {r["class"]: r for r in self.slice_metric_rows.get(z, [])}
        classes = [r["class"] for r in rows] + [c for c in here if c not in {r["class"] for r in rows}]
        vol = {r["class"]: r for r in rows}

        def fmt(v):
            return ("" if not np.isfinite(v) else round(v, 3)) if isinstance(v, float) else v

        if kind == "reference":
            keys = list(METRIC_COLUMNS[1:])
            cols = ["class", *keys, *[f"slice {z} {k}" for k in keys]]
            data = [[c, *[fmt(vol[c][k]) if c in vol else "" for k in keys],
                     *[fmt(here[c][k]) if c in here else "" for k in keys]] for c in classes]
        else:  # HU as mean ± SD for the eye
            def hu(r):
                return f"{r['hu_mean']:.1f} ± {r['hu_sd']:.1f}"

            cols = ["class", "volume_ml", "HU mean ± SD", "voxels", f"slice {z} ml", f"slice {z} HU"]
            data = [[c, *([round(vol[c]["volume_ml"], 1), hu(vol[c]), vol[c]["voxels"]] if c in vol else ["", "", ""]),
                     *([round(here[c]["volume_ml"], 2), hu(here[c])] if c in here else ["", ""])] for c in classes]
        self._metrics.value = _table(data, cols)
        self._metrics.native.resizeColumnsToContents()

    def export_csv(self, path=None) -> Path | None:
        """Write the metric rows (computed now) as CSV to ``path`` (default: the CSV field): the
        volume's rows, then every slice's (``review.report.metric_csv_rows``)."""
        if not self._valid_target():
            notify_error("Choose an image and a mask first.")
            return None
        kind, rows, per_slice = self.compute_metrics(per_slice=True)
        cols = METRIC_COLUMNS if kind == "reference" else STAT_COLUMNS
        try:
            out = write_csv(path or self._csv_path.value, metric_csv_rows(rows, per_slice, self.axis),
                            [cols[0], *CSV_SCOPE_COLUMNS, *cols[1:]])
        except (InputError, OSError) as exc:
            notify_error(f"metrics CSV not written: {one_line(exc)}")
            return None
        self._status.value = f"metrics written to {out}"
        return out

    # ------------------------------------------------------------------ save
    def save(self, path=None) -> tuple[Path, Path] | None:
        """Write the mask (NIfTI on the source geometry) and ``<name>.review.json`` (and for a DICOM
        source ``<name>.seg.dcm``, a DICOM SEG: :meth:`_save_seg`); clears the autosave. Returns
        (mask path, log path), None when refused (one notification line)."""
        if not self._valid_target() or self.state is None:
            notify_error("Choose an image and a mask first.")
            return None
        mask = self._mask.value
        vol = self._volume()
        kind, rows = self.compute_metrics()
        ref = self._reference.value
        run = dict((mask.metadata or {}).get(RUN_KEY) or {})
        if not run.get("model") and self._model_info:
            run["model"] = self._model_info["model"]
        rec = review_record(self.state.to_dict(), reader=str(self._reader.value or ""), run=run,
                            uncertainty=self.votes.record() if self.votes else None,
                            metrics={"kind": kind, "rows": rows}, class_names=self.class_names(),
                            image_key=self.key, reference=ref.name if ref is not None else None)
        like = vol if vol.source_affine is not None else None
        try:
            out = save_review(path or self._output.value, np.asarray(mask.data), like=like, spacing=vol.spacing,
                              origin=vol.origin, run=run, record=rec)
        except (InputError, OSError) as exc:  # a full disk, a folder that cannot be made or written
            notify_error(f"not saved, the review stays open with its edits: {one_line(exc)}")
            return None
        if self.autosaver is not None:
            self.autosaver.clear()
        self.dirty = False
        self._status.value = f"saved {out[0].name} and {out[1].name} ({time.strftime('%H:%M:%S')})"
        if vol.meta.get("format") == "dicom":
            self._save_seg(out[0], np.asarray(mask.data), vol, run)
        return out

    def _save_seg(self, mask_path: Path, data, vol, run: dict) -> Path | None:
        """Beside the NIfTI ``x.nii.gz``: ``x.seg.dcm``, a DICOM SEG of the source series (classes the
        reader painted or erased are SEMIAUTOMATIC, the others AUTOMATIC); None when refused."""
        from ..io.dicom_seg import write_dicom_seg

        self.last_seg = None
        name = mask_path.name
        stem = name[: -len(".nii.gz")] if name.endswith(".nii.gz") else mask_path.stem
        names = self.class_names() or ["background"]
        names += [f"label {i}" for i in range(len(names), int(np.max(data, initial=0)) + 1)]
        model = run.get("model") or {}
        alg = {"name": " ".join(str(model[k]) for k in ("family", "config_name") if model.get(k)) or None,
               "checkpoint_sha256": model.get("checkpoint_sha256")}
        try:
            seg = write_dicom_seg(mask_path.with_name(stem + ".seg.dcm"), data, vol, names, algorithm=alg,
                                  edited_classes=set(self.edited_classes),
                                  record={**run, "written_by": "Review dock: the reviewed mask as DICOM SEG"})
        except (InputError, OSError) as exc:
            notify_error(f"DICOM SEG not written: {one_line(exc)}")
            return None
        self.last_seg = seg
        self._status.value += f"; {seg.name}"
        return seg

    # ------------------------------------------------------------------ back to training
    def add_to_training_set(self, folder=None) -> dict | None:
        """Add the image and the mask as they are now to the training folder (``folder`` or the
        Save tab's); returns ``review.training_export.add_training_case``'s report, None when refused."""
        from ..review.training_export import add_training_case

        if not self._valid_target():
            notify_error("Choose an image and a mask first.")
            return None
        target = folder or self._train_dir.value
        if not target or str(target) in ("", "."):
            notify_error("Choose a training folder in the Save tab first.")
            return None
        vol = self._volume()
        try:
            rep = add_training_case(target, np.asarray(self._image.value.data), np.asarray(self._mask.value.data),
                                    vol.spacing, vol.origin, self.class_names(), name=self._image.value.name,
                                    strip_identifiers=bool(self._strip.value))
        except (InputError, OSError) as exc:
            notify_error(f"not added to the training set: {one_line(exc)}")
            return None
        verb = "updated" if rep["replaced"] else "added"
        self._status.value = (f"{verb} training case {rep['case']} in {rep['dataset'].parent}; kept "
                              f"{', '.join(rep['kept'])}; dropped {', '.join(rep['dropped'])}")
        return rep

    # ------------------------------------------------------------------ reference from a file
    def load_reference(self, path=None, label_map: str | None = None):
        """Read a label NIfTI onto the image's grid (``io.labels.labels_for_image``: resampled
        nearest-neighbour when its grid differs, with a warning), map its ids (``"5:1,1:2"``),
        add it as ``<file> (reference)`` and make it the reference. Returns the layer, or None when
        refused (one notification line)."""
        from napari.utils.notifications import show_warning

        from ..io.labels import labels_for_image
        from ..training.data import apply_label_map, parse_label_map
        from ._run import add_class_labels

        image = self._image.value
        path = path or self._ref_file.value
        if image is None or not path or str(path) in ("", ".") or Path(path).is_dir():
            notify_error("Choose an image and a reference label file first.")
            return None
        names = self.class_names() or ["background"]
        try:
            ids, notes = labels_for_image(self._volume(), path)
            mapping = parse_label_map(self._ref_map.value if label_map is None else label_map)
            data = apply_label_map(ids, mapping, max(len(names), int(ids.max(initial=0)) + 1 if mapping is None else 256))
        except (InputError, OSError) as exc:
            notify_error(f"reference not loaded: {one_line(exc)}")
            return None
        for n in notes:
            show_warning(n)
        name = Path(path).name.replace(".nii.gz", "").replace(".nii", "") + " (reference)"
        lay = add_class_labels(self.viewer, image, name, names, opacity=0.4, visible=False)
        lay.data[:] = data
        lay.refresh()
        self.reset_choices()
        self._reference.value = lay
        self._status.value = f"reference {name} loaded ({len(np.unique(data)) - 1} classes)"
        return lay
