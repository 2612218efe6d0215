"""The AR-Seg explorer's "Edit" tab: correct the consensus at a coarse scale k, redraw scales k+1..K.

Issue 13. "results of" picks what is edited: the Run tab's whole-slice results, or the Box tab's
region-of-interest result (ROI mode). With the View tab's scale slider (mirrored here) at k
(1 <= k < K) on a slice that has results:

* "Edit at scale k" takes the slice's scale-k consensus (the mean of the N masks decoded from
  scales 1..k > the threshold: what the "scales" view shows; decoded in a worker when needed),
  resamples it onto the model's M x M mask grid (``ArSegPredictor.to_mask_grid``; ROI mode: the
  crop's grid, ``ArSegRoiPredictor.to_mask_grid``) and puts it in the Labels layer
  ``AR-Seg edit (scale k)``: shape (1, M, M), placed with the image's scale and translate composed
  with ``mask_grid_transform`` (mask pixel u sits at slice / box pixel u * s + t), one slice deep
  at the slice's z. It is selected in paint mode with the target class and a brush half a scale-k
  cell wide: paint adds, the eraser removes.
* Optional prompts: clicks in the Points layer ``AR-Seg clicks`` ("Add clicks"; green = positive,
  i.e. inside, magenta = negative; feature ``positive``): a click on the edited slice sets the
  whole scale-k cell under it (``click_cell``) inside / outside before the mask is quantised.
  "only inside the Box tab's box" limits a whole-slice redraw to the Box tab's rectangle (in ROI
  mode the box is the region anyway).
* "Redraw finer scales" runs ``ArSegPredictor.redraw(slice, edit, k, edited_on="mask", clicks=...,
  box=..., previous=the consensus shown)`` (ROI mode: ``ArSegRoiPredictor.redraw`` on the box) in
  a worker; Cancel, or a failure, writes nothing. On success, on the GUI thread: the slice's
  consensus is replaced inside the box (the whole slice without one) as ONE undo step
  (``block_history`` + one ``data_setitem``) in ``I [arseg] consensus`` (ROI mode: the Box tab's
  "paste into" layer); the slice's votes and tokens (``ArSegResults.redrawn``; ROI mode: the
  box result's), variability and scale progression follow; the status and the canvas overlay show
  the redraw's time next to the run's time per slice.
* Ctrl+Z on that layer undoes the redraw; :meth:`RedrawPanel.sync` then puts the slice's earlier
  results back (it compares the layer's pixels with what each redraw found there and wrote), so
  the variability and the scales follow the undo (and a redo).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
from magicgui.widgets import CheckBox, Container, Label, PushButton, RadioButtons, Slider

from ..errors import InputError, one_line
from ._run import notify_error

__all__ = ["RedrawPanel", "EDIT_LAYER", "CLICKS_LAYER", "CLICK_COLORS"]

#: name of the edit layer (formatted with the scale k)
EDIT_LAYER = "AR-Seg edit (scale {k})"
#: name of the clicks layer
CLICKS_LAYER = "AR-Seg clicks"
#: face colour of a positive (inside) and a negative (outside) click
CLICK_COLORS = {True: "#33ff66", False: "#ff33cc"}


@dataclass
class _Applied:
    """One redraw written into a Labels layer: the layer's pixels at ``index`` before
    (``prior``) and after (``written``) it, the results' states before and after it, how to put
    a state back (``restore``) and whether those results still exist (``valid``)."""

    layer: Any
    index: tuple
    prior: np.ndarray
    written: np.ndarray
    before: Any
    after: Any
    restore: Callable[[Any], None]
    valid: Callable[[], bool]


@dataclass
class _Job:
    """What an edit layer was made from: mode "run" (``owner`` an ``ArSegResults``) or "box"
    (``owner`` the Box tab's ``RoiResult``), slice z, scale k, the slice's version (run mode)."""

    mode: str
    owner: Any
    z: int
    k: int
    version: int = 0


class RedrawPanel(Container):
    """The "Edit" tab of :class:`~napari_genseg.ui.arseg_explorer.ArSegExplorer` (see the module
    docstring). It reads the explorer's results, predictor, volume, threshold and scale slider,
    and in ROI mode the Box tab's result, predictor and "paste into" layer."""

    def __init__(self, explorer):
        super().__init__()
        self.ex = explorer
        self.viewer = explorer.viewer
        self.worker = None  # the redraw
        self._prep = None  # decoding the scale-k consensus for the edit layer
        self._cancelled = False
        self.edit_layer = None
        self.clicks_layer = None
        self._edit: _Job | None = None  # what the edit layer was made from
        self._history: dict[tuple, list[_Applied]] = {}
        self._current: dict[tuple, Any] = {}  # key -> the results state last put in place by us
        self._versions: dict[int, int] = {}  # z -> the run results' version of that slice after our change
        self._watched: list = []  # layers whose refreshes call sync()
        self.last = None  # the RedrawResult applied last
        self._source = RadioButtons(label="results of", choices=[("Run tab", "run"), ("Box tab (ROI)", "box")],
                                    value="run", orientation="horizontal",
                                    tooltip="edit the whole-slice run, or the Box tab's region-of-interest result")
        self._k = Slider(label="scale k", min=1, max=7, value=3,
                         tooltip="the scale to correct (the View tab's scale slider follows)")
        self._edit_btn = PushButton(text="Edit at scale 3")
        self._redraw_btn = PushButton(text="Redraw finer scales")
        row = Container(widgets=[self._edit_btn, self._redraw_btn], layout="horizontal", labels=False)
        row.margins = (0, 0, 0, 0)
        self._sign = RadioButtons(label="clicks", choices=[("positive (inside)", True), ("negative (outside)", False)],
                                  value=True, orientation="horizontal",
                                  tooltip="a click sets its whole scale-k cell inside (green) or outside (magenta)")
        self._clicks_btn = PushButton(text="Add clicks")
        self._use_box = CheckBox(text="only inside the Box tab's box", value=False,
                                 tooltip="the redraw changes the consensus inside the box only")
        row2 = Container(widgets=[self._clicks_btn, self._use_box], layout="horizontal", labels=False)
        row2.margins = (0, 0, 0, 0)
        self._status = Label(value="")
        self._hint = ""
        self._status.native.setWordWrap(True)
        self.extend([self._source, self._k, row, self._sign, row2, self._status])
        self.native.layout().addStretch(1)  # keep the rows together at the top of the tab
        self._source.changed.connect(self._on_source)
        self._k.changed.connect(self._on_k)
        self._edit_btn.changed.connect(self.edit_at_scale)
        self._redraw_btn.changed.connect(self.redraw)
        self._clicks_btn.changed.connect(self.add_clicks)
        self._sign.changed.connect(self._on_sign)
        self.refresh_hint()

    # ------------------------------------------------------------------ mode and scale
    @property
    def roi_mode(self) -> bool:
        return self._source.value == "box"

    def _on_source(self, *_):
        self._use_box.enabled = not self.roi_mode  # in ROI mode the box is the region
        self._status.value = ""
        self.refresh_hint()

    def _num_scales(self) -> int:
        if self.roi_mode and self.ex.roi.progression is not None:
            return int(self.ex.roi.progression.shape[1])
        res = self.ex.results
        return res.num_scales if res is not None else int(self.ex._scale.max)

    def _on_k(self, *_):
        """The scale chosen here is also shown in the View tab (its slider shows that scale)."""
        k = int(self._k.value)
        if int(self.ex._scale.value) != k:
            self.ex._scale.value = k
        self.refresh_hint()

    def refresh_hint(self) -> None:
        """Follow the View tab's scale slider; name the action and what it needs."""
        K = self._num_scales()
        with self._k.changed.blocked():
            self._k.max = max(K - 1, 1)
            self._k.value = min(max(int(self.ex._scale.value), 1), max(K - 1, 1))
        k = int(self._k.value)
        self._edit_btn.text = f"Edit at scale {k}"
        if self.worker is None and self._prep is None and self._status.value in ("", self._hint):
            try:
                z = self._slice()
                self._hint = f"slice {z}: Edit at scale {k}, paint / erase, then Redraw finer scales."
            except InputError as exc:
                self._hint = str(exc)
            self._status.value = self._hint

    def _slice(self) -> int:
        """The current slice, if the chosen results cover it. Raises InputError."""
        ex = self.ex
        if self.roi_mode:
            r = ex.roi.result
            if r is None:
                raise InputError("Run in box first (Box tab), then edit a scale of its result.")
            z = ex.current_slice()
            if not r.box.z0 <= z < r.box.z1:
                raise InputError(f"the box result holds slices {r.box.z0}..{r.box.z1 - 1}; this is slice {z}")
            return z
        z = ex._shown_slice()
        if z is None:
            raise InputError("Run AR-Seg on this slice first (Run tab), then edit a scale.")
        return z

    # ------------------------------------------------------------------ edit at scale k
    def edit_at_scale(self, *_):
        """Fill the edit layer with the current slice's scale-k consensus on the mask grid (in a
        worker). Returns the worker, or None when refused (no results here, or a job running)."""
        from napari.qt.threading import thread_worker

        from .arseg_state import decode_composite

        ex = self.ex
        if self._prep is not None or self.worker is not None or ex.worker is not None or ex.roi.worker is not None:
            return None
        try:
            z = self._slice()
        except InputError as exc:
            self._status.value = self._hint = str(exc)
            notify_error(exc)
            return None
        K, k = self._num_scales(), int(self._k.value)
        if not 1 <= k < K:
            notify_error(f"choose a scale 1..{K - 1}: the last scale leaves nothing to redraw")
            return None
        self.sync()
        thr = float(ex._threshold.value)
        if self.roi_mode:
            roi = ex.roi
            r, pred, spacing = roi.result, roi.predictor, tuple(roi.volume.spacing)
            votes = roi.progression[z - r.box.z0, k - 1]
            job = _Job("box", r, z, k)

            def work():
                cons = votes.astype(np.float32) / r.n > thr
                return None, pred.to_mask_grid(cons, r.box, spacing), pred.mask_grid_transform(r.box, spacing)
        else:
            res, pred, vol = ex.results, ex.predictor, ex.volume
            version, tokens, regions = res.decode_job(z)
            hw, spacing = vol.shape[1:], vol.spacing[1:]
            cached = res.scale_votes(z, k)
            job = _Job("run", res, z, k, version)

            def work():
                masks, votes = None, cached
                if votes is None:
                    masks = decode_composite(pred, tokens, regions, hw, spacing, upto_scale=k)
                    votes = masks.sum(0, dtype=np.uint8)
                grid = pred.to_mask_grid(res.consensus_of(votes, thr) > 0, spacing)
                return masks, grid, pred.mask_grid_transform(hw, spacing)

        self._prep = thread_worker(work, start_thread=False, ignore_errors=True)()
        self._prep.returned.connect(lambda out, job=job: self._show_edit(job, *out))
        self._prep.errored.connect(lambda exc: self._failed(exc, "Decoding the scale failed"))
        self._prep.finished.connect(self._prep_finished)
        self._status.value = f"decoding scale {k} of slice {z}..."
        self._busy(True)
        self._prep.start()
        return self._prep

    def _prep_finished(self):
        self._prep = None
        self._busy(False)

    def _image_layer(self):
        return self.ex.roi._image_layer if self.roi_mode else self.ex._results_image

    def _layer_geometry(self, image, z: int, transform, origin_yx=(0, 0)):
        """napari (scale, translate) of a (1, M, M) mask-grid array on slice z of ``image`` whose
        mask pixel u lies at pixel ``origin + u * s + t`` of the slice."""
        (sy, sx), (ty, tx) = transform
        s, t = np.asarray(image.scale, float)[-3:], np.asarray(image.translate, float)[-3:]
        scale = (s[0], s[1] * sy, s[2] * sx)
        translate = (t[0] + z * s[0], t[1] + (origin_yx[0] + ty) * s[1], t[2] + (origin_yx[1] + tx) * s[2])
        return scale, translate

    def _owner_now(self, mode: str):
        return self.ex.roi.result if mode == "box" else self.ex.results

    def _show_edit(self, job: _Job, masks, grid: np.ndarray, transform) -> None:
        from napari.utils.colormaps import DirectLabelColormap

        if masks is not None:
            job.owner.store_scale(job.z, job.k, masks, job.version)
        if job.owner is not self._owner_now(job.mode):
            self._status.value = "the results changed meanwhile: Edit again"
            return
        cid = job.owner.target_class
        data = (np.asarray(grid, bool) * cid).astype(np.uint8)[None]
        if job.mode == "box":
            image, origin = self.ex.roi._image_layer, (job.owner.box.y0, job.owner.box.x0)
            pk = int(self.ex.roi.predictor.base.cfg.patch_nums[job.k - 1])
        else:
            image, origin = self.ex._results_image, (0, 0)
            pk = int(self.ex.predictor.cfg.patch_nums[job.k - 1])
        scale, translate = self._layer_geometry(image, job.z, transform, origin)
        name = EDIT_LAYER.format(k=job.k)
        lay = self.edit_layer
        if lay is not None and lay in self.viewer.layers and lay.data.shape == data.shape:
            lay.data = data
            lay.scale, lay.translate, lay.name = scale, translate, name
            lay.visible = True
        else:
            if lay is not None and lay in self.viewer.layers:
                self.viewer.layers.remove(lay)
            colors = {0: (0, 0, 0, 0), cid: (1.0, 0.85, 0.1, 1.0), None: (1.0, 0.85, 0.1, 1.0)}
            lay = self.viewer.add_labels(data, name=name, scale=scale, translate=translate, opacity=0.55,
                                         colormap=DirectLabelColormap(color_dict=colors))
            self.edit_layer = lay
        lay.metadata["genseg_edit"] = {"z": job.z, "k": job.k, "mode": job.mode}
        self._edit = job
        if job.mode == "run" and self.ex._show.value == "scales":
            self.ex._show.value = "consensus"  # the fine consensus under the coarse edit
        self.viewer.layers.selection.active = lay
        lay.selected_label = cid
        M = data.shape[-1]
        lay.brush_size = max(1, math.ceil(M / pk / 2))  # half a scale-k cell
        lay.mode = "paint"
        where = f"box {job.owner.box}, " if job.mode == "box" else ""
        self._status.value = (f"{where}slice {job.z}, scale {job.k} ({pk}x{pk} cells on the {M}x{M} mask grid): "
                              "paint / erase, add clicks, then Redraw finer scales")

    # ------------------------------------------------------------------ prompts
    def add_clicks(self, *_):
        """Add (or select) the clicks Points layer on the image's grid, in add mode."""
        image = self._image_layer() or self.ex._image.value
        if image is None:
            notify_error("Choose an image layer first.")
            return None
        lay = self.clicks_layer
        if lay is None or lay not in self.viewer.layers:
            h, w = image.data.shape[-2:]
            lay = self.viewer.add_points(
                np.empty((0, 3)), ndim=3, name=CLICKS_LAYER, scale=image.scale, translate=image.translate,
                features={"positive": np.array([], bool)}, size=max(3.0, min(h, w) / 40),  # image pixels
                face_color="positive", face_color_cycle=CLICK_COLORS, border_color="black", border_width=0.15)
            self.clicks_layer = lay
        self._on_sign()
        self.viewer.layers.selection.active = lay
        lay.mode = "add"
        return lay

    def _on_sign(self, *_):
        lay = self.clicks_layer
        if lay is not None:
            lay.feature_defaults = {"positive": bool(self._sign.value)}  # the colour follows the feature

    def clicks(self, image, z: int) -> list[tuple[int, int, bool]]:
        """The clicks on slice z as (y, x, positive) pixels of ``image`` (others are ignored)."""
        lay = self.clicks_layer
        if lay is None or lay not in self.viewer.layers or len(lay.data) == 0:
            return []
        pos = np.asarray(lay.features["positive"], bool) if "positive" in lay.features else np.ones(len(lay.data), bool)
        out = []
        h, w = image.data.shape[-2:]
        for p, positive in zip(np.asarray(lay.data), pos):
            d = np.asarray(image.world_to_data(lay.data_to_world(p)))[-3:]
            zi, y, x = (int(round(float(v))) for v in d)
            if zi == z and 0 <= y < h and 0 <= x < w:
                out.append((y, x, bool(positive)))
        return out

    def _box(self, z: int):
        """(y0, y1, x0, x1) of the Box tab's box on slice z, or None when not used. Raises InputError."""
        if not self._use_box.value:
            return None
        b = self.ex.roi.current_box()
        if not b.z0 <= z < b.z1:
            raise InputError(f"the box lies on slices {b.z0}..{b.z1 - 1}, the edit on slice {z}")
        return (b.y0, b.y1, b.x0, b.x1)

    # ------------------------------------------------------------------ redraw
    def redraw(self, *_):
        """Redraw scales k+1..K of the edited slice in a worker. Returns the worker, or None when
        refused (no edit layer, the results gone, a job running, a bad box)."""
        from napari.qt.threading import thread_worker

        ex = self.ex
        if self.worker is not None or self._prep is not None or ex.worker is not None or ex.roi.worker is not None:
            return None
        job, lay = self._edit, self.edit_layer
        if job is None or lay is None or lay not in self.viewer.layers:
            notify_error("Edit at scale k first (the edit layer holds the corrected coarse mask).")
            return None
        if job.owner is not self._owner_now(job.mode) or (job.mode == "run" and job.z not in job.owner.tokens):
            notify_error("the results this edit was made from are gone: Edit at scale k again")
            return None
        self.sync()
        z, k, thr = job.z, job.k, float(ex._threshold.value)
        edited = np.asarray(lay.data[0]) != 0  # a copy: the reader may keep painting meanwhile
        if job.mode == "box":
            roi, r = ex.roi, job.owner
            b, pred, vol = r.box, roi.predictor, roi.volume
            clicks = [(y - b.y0, x - b.x0, p) for y, x, p in self.clicks(roi._image_layer, z)
                      if b.y0 <= y < b.y1 and b.x0 <= x < b.x1]
            data, spacing = vol.data, tuple(vol.spacing)

            def work():
                out = pred.redraw(data, spacing, b, edited, k, z=z, edited_on="mask", n_samples=r.n,
                                  clicks=clicks, threshold=thr)
                return (out, *pred.decode_progression(out.tokens, r.crop, b))

            where = f"in box {b}"
        else:
            res, pred, vol = job.owner, ex.predictor, ex.volume
            cons = ex._layer("consensus")
            if cons is None:
                notify_error("the consensus layer is gone: run AR-Seg again")
                return None
            try:
                box = self._box(z)
            except InputError as exc:
                notify_error(exc)
                return None
            clicks = self.clicks(ex._results_image, z)
            slice_hu = np.asarray(vol.data[z], np.float32)
            opts = dict(spacing_yx=tuple(vol.spacing[1:]), edited_on="mask", target_class=res.target_class,
                        n_samples=res.n, box=box, clicks=clicks,
                        previous=np.asarray(cons.data[z]) == res.target_class, threshold=thr)

            def work():
                return (pred.redraw(slice_hu, edited, k, **opts),)

            where = "in the box" if box is not None else "on the whole slice"
        self._cancelled = False
        self.worker = thread_worker(work, start_thread=False, ignore_errors=True)()
        self.worker.returned.connect(lambda out, job=job: self._apply(job, *out))
        self.worker.errored.connect(lambda exc: self._failed(exc, "Redraw failed"))
        self.worker.finished.connect(self._redraw_finished)
        self._status.value = (f"redrawing scales {k + 1}..{self._num_scales()} of slice {z} {where} "
                              f"({len(clicks)} click(s))...")
        self._busy(True, cancellable=True)
        self.worker.start()
        return self.worker

    def cancel(self) -> None:
        """Drop the running redraw: nothing of it will be written."""
        if self.worker is not None:
            self._cancelled = True
            self.worker.quit()
            self._status.value = "redraw cancelled: nothing changed"

    def _busy(self, busy: bool, cancellable: bool = False) -> None:
        """Buttons while a job of this tab runs (Cancel only for a redraw)."""
        self._edit_btn.enabled = self._redraw_btn.enabled = not busy
        self.ex._run.enabled = not busy and self.ex.worker is None
        self.ex._cancel.enabled = (busy and cancellable) or self.ex.worker is not None

    def _redraw_finished(self):
        self.worker = None
        self._busy(False)

    def _failed(self, exc, context: str) -> None:
        notify_error(exc, context)
        self._status.value = f"{context.lower()}: {one_line(exc)} (nothing changed)"

    def _apply(self, job: _Job, r, prog=None, masks=None) -> None:
        """Write a redraw's result (GUI thread): see the module docstring."""
        if self._cancelled:
            return
        if job.owner is not self._owner_now(job.mode):
            self._status.value = "the results changed during the redraw: nothing written"
            return
        self.sync()
        if job.mode == "box":
            layer, n_changed, run_s, region = self._apply_box(job, r, prog, masks)
        else:
            if job.z not in job.owner.tokens or self.ex._layer("consensus") is None:
                self._status.value = "the results changed during the redraw: nothing written"
                return
            layer, n_changed, run_s, region = self._apply_run(job, r)
        self.last = r
        emb = "embedding reused" if r.embedding_cached else "image re-embedded"
        timing = (f"redraw from scale {r.from_scale}: {r.seconds:.2f} s"
                  + (f" (full run {run_s:.2f} s/slice)" if run_s is not None else "") + f", {emb}")
        target = "the consensus layer" if job.mode == "run" else f"'{layer.name}'"
        self._status.value = (f"{timing}. Slice {job.z}: {n_changed} pixel(s) changed{region}; "
                              f"Ctrl+Z on {target} undoes it.")
        if self.edit_layer is not None and self.edit_layer in self.viewer.layers:
            self.edit_layer.visible = False
        self.viewer.layers.selection.active = layer
        overlay = self.ex.text_overlay()
        overlay.text = f"redraw from scale {r.from_scale}: {r.seconds:.1f} s" + (
            f" (full run {run_s:.1f} s)" if run_s is not None else "")
        overlay.visible = True

    def _record(self, key, entry: _Applied) -> None:
        """Keep a redraw for undo / redo and make its results current (before its pixels are
        written: the write refreshes the layer, which calls sync)."""
        self.watch(entry.layer)
        self._history.setdefault(key, []).append(entry)
        entry.restore(entry.after)
        self._current[key] = entry.after

    def _apply_run(self, job: _Job, r):
        ex, res = self.ex, job.owner
        cons = ex._layer("consensus")
        z, cid = job.z, res.target_class
        y0, y1, x0, x1 = r.box
        h, w = res.shape[1:]
        inside = np.zeros((h, w), bool)
        inside[y0:y1, x0:x1] = True
        from ..predictors.arseg import paste_target

        old = np.asarray(cons.data[z]).copy()
        new = paste_target(old, r.consensus, cid, inside)  # other classes' pixels are kept
        whole = (y0, y1, x0, x1) == (0, h, 0, w)
        before = res.state(z)
        after = res.redrawn(z, np.asarray(r.samples).sum(0, dtype=np.uint8), r.tokens, None if whole else r.box)

        def restore(st, res=res, z=z):
            res.set_state(z, st)
            self._versions[z] = res.version[z]
            self._refresh_run_slice(z)

        def valid(res=res, z=z, cons=cons):
            return (self.ex.results is res and z in res.tokens and cons in self.viewer.layers
                    and res.version.get(z) == self._versions.get(z))

        self._record(("run", z), _Applied(cons, (z,), old, new, before, after, restore, valid))
        idx = np.nonzero(new != old)
        if idx[0].size:
            with cons.block_history():
                cons.data_setitem((np.full(idx[0].size, z), idx[0], idx[1]), new[idx])
        ex._show.value = "consensus"
        return cons, int(idx[0].size), res.run_seconds.get(z), "" if whole else " in the box"

    def _apply_box(self, job: _Job, r, prog, masks):
        from ..roi import RoiBox

        roi, res = self.ex.roi, job.owner
        b, i = res.box, job.z - res.box.z0
        box = RoiBox(job.z, job.z + 1, b.y0, b.y1, b.x0, b.x1)
        lay, old, new = roi.plan_paste(np.asarray(r.consensus, bool)[None], box, res.target_class)
        before = (res.votes[i].copy(), res.tokens[i].copy(), roi.progression[i].copy(), roi.masks[i].copy())
        after = (np.asarray(r.samples).sum(0, dtype=np.uint8), np.asarray(r.tokens).astype(np.int16),
                 np.asarray(prog, np.uint8), np.asarray(masks, bool))

        def restore(st, res=res, i=i):
            res.votes[i], res.tokens[i], roi.progression[i], roi.masks[i] = st
            if roi.result is res:
                roi._show_results(float(self.ex._threshold.value))

        def valid(res=res, lay=lay):
            return roi.result is res and lay in self.viewer.layers

        self._record(("box", job.z, b), _Applied(lay, box.slices, old, new, before, after, restore, valid))
        n = roi.write_box(lay, box, old, new)
        return lay, n, res.elapsed / max(b.shape[0], 1), f" in box {b}"

    # ------------------------------------------------------------------ undo / redo
    def _refresh_run_slice(self, z: int) -> None:
        """Variability and the shown sample / scale of slice z after its results changed."""
        ex, res = self.ex, self.ex.results
        var = ex._layer("variability")
        if var is not None:
            var.data[z] = res.disagreement([z], float(ex._threshold.value))[0]
            var.refresh()
        if ex._show.value != "consensus":
            ex._show_slice()

    def watch(self, layer) -> None:
        """Call :meth:`sync` whenever ``layer`` is redrawn on screen: napari's Labels undo / redo
        rewrite the data and refresh the layer, emitting no edit event."""
        if any(lay is layer for lay in self._watched):
            return
        self._watched.append(layer)
        layer.events.thumbnail.connect(self._on_refresh)

    def _on_refresh(self, *_):
        if self._history:
            self.sync()

    def sync(self) -> None:
        """Match each redrawn slice's results to what its layer shows: after Ctrl+Z of a redraw
        the pixels hold what that redraw found (``prior``) and the results from before it come
        back; after a redo, what it wrote and the results after it. Other edits leave them be;
        redraws whose results were replaced since (a new run) are forgotten. The match is by
        pixels: pixels equal to what a redraw wrote count as "after" it (a redraw that changed
        nothing adds no undo step and never goes back)."""
        for key, entries in list(self._history.items()):
            entries[:] = [e for e in entries if e.valid()]
            if not entries:
                self._history.pop(key, None)
                self._current.pop(key, None)
                continue
            shown = np.asarray(entries[-1].layer.data[entries[-1].index])
            for e in reversed(entries):
                target = (e.after if np.array_equal(shown, e.written)
                          else e.before if np.array_equal(shown, e.prior) else None)
                if target is not None:
                    if self._current.get(key) is not target:
                        self._current[key] = target
                        e.restore(target)
                    break
