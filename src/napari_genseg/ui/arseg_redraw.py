"""The AR-Seg explorer's "Edit" tab: correct the consensus at a coarse scale k, redraw scales k+1..K.

Issue 13. With the View tab's scale slider (mirrored here) at k (1 <= k < K) on a slice that has
results:

* "Edit at scale k" decodes the slice's scale-k consensus (the mean of the N masks decoded from
  scales 1..k > the threshold: what the "scales" view shows) in a worker, resamples it onto the
  model's M x M mask grid (``ArSegPredictor.to_mask_grid``) and puts it in the Labels layer
  ``AR-Seg edit (scale k)``: shape (1, M, M), placed on the slice with the image's scale and
  translate composed with ``ArSegPredictor.mask_grid_transform`` (mask pixel u sits at slice pixel
  u * s + t), one slice deep at the slice's z. It is selected in paint mode with the target class
  and a brush half a scale-k cell wide: paint adds, the eraser removes.
* Optional prompts: clicks in the Points layer ``AR-Seg clicks`` ("Add clicks"; green = positive,
  i.e. inside, magenta = negative; feature ``positive``): a click on the edited slice sets the whole
  scale-k cell under it (``ArSegPredictor.click_cell``) to inside / outside before the mask is
  quantised. "only inside the box" limits the redraw to the Box tab's rectangle.
* "Redraw finer scales" runs ``ArSegPredictor.redraw(slice, edit, k, edited_on="mask", clicks=...,
  box=..., previous=the consensus shown)`` in a worker (Cancel, or a failure, writes nothing). On
  success, on the GUI thread: the slice's consensus in ``I [arseg] consensus`` is replaced inside
  the box (the whole slice without one) as ONE undo step (``block_history`` + one
  ``data_setitem``); the slice's votes, tokens (inside the box: ``ArSegResults.redrawn``),
  variability and scale progression follow; the status and the canvas overlay show the redraw's
  time next to the full run's time per slice.
* Ctrl+Z on the consensus layer undoes the redraw; :meth:`RedrawPanel.sync` then puts the slice's
  earlier votes and tokens back (it compares the layer's slice with what each redraw found and
  wrote), so the variability and the scales follow the undo (and a redo).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from magicgui.widgets import CheckBox, Container, Label, PushButton, RadioButtons, Slider

from ..errors import InputError
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
    """One redraw written into the consensus layer: slice z's labels before (``prior``) and after
    (``written``) it, and the slice's results before and after it (``arseg_state.SliceState``)."""

    results: object
    z: int
    prior: np.ndarray
    written: np.ndarray
    before: object
    after: object


@dataclass
class _Job:
    results: object
    z: int
    k: int
    version: int


class RedrawPanel(Container):
    """The "Edit" tab of :class:`~napari_genseg.ui.arseg_explorer.ArSegExplorer` (see the module
    docstring). It reads the explorer's results, predictor, volume, threshold and scale slider."""

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
        self._history: dict[int, list[_Applied]] = {}
        self._versions: dict[int, int] = {}  # z -> the results' version of that slice after our last change
        self._watched = None  # the consensus layer whose refreshes call sync()
        self.last = None  # the RedrawResult applied last
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
        self.extend([self._k, row, self._sign, row2, self._status])
        self.native.layout().addStretch(1)  # keep the rows together at the top of the tab
        self._k.changed.connect(self._on_k)
        self._edit_btn.changed.connect(self.edit_at_scale)
        self._redraw_btn.changed.connect(self.redraw)
        self._clicks_btn.changed.connect(self.add_clicks)
        self._sign.changed.connect(self._on_sign)
        self.refresh_hint()

    # ------------------------------------------------------------------ the scale
    def _num_scales(self) -> int:
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
            z = self.ex._shown_slice()
            self._hint = ("Run AR-Seg on this slice first (Run tab)." if z is None else
                          f"slice {z}: Edit at scale {k}, paint / erase, then Redraw finer scales.")
            self._status.value = self._hint

    # ------------------------------------------------------------------ edit at scale k
    def edit_at_scale(self, *_):
        """Decode the current slice's scale-k consensus (worker) into the edit layer. Returns the
        worker, or None when refused (no results here, or a job running)."""
        from napari.qt.threading import thread_worker

        from .arseg_state import decode_composite

        ex = self.ex
        if self._prep is not None or self.worker is not None or ex.worker is not None:
            return None
        z = ex._shown_slice()
        if z is None:
            notify_error("Run AR-Seg on this slice first (Run tab), then edit a scale.")
            return None
        res, pred, vol = ex.results, ex.predictor, ex.volume
        k = int(self._k.value)
        if not 1 <= k < res.num_scales:
            notify_error(f"choose a scale 1..{res.num_scales - 1}: the last scale leaves nothing to redraw")
            return None
        self.sync()
        version, tokens, regions = res.decode_job(z)
        hw, spacing = vol.shape[1:], vol.spacing[1:]
        thr = float(ex._threshold.value)
        cached = res.scale_votes(z, k)

        @thread_worker(start_thread=False, ignore_errors=True)
        def work():
            masks = None
            votes = cached
            if votes is None:
                masks = decode_composite(pred, tokens, regions, hw, spacing, upto_scale=k)
                votes = masks.sum(0, dtype=np.uint8)
            grid = pred.to_mask_grid(res.consensus_of(votes, thr) > 0, spacing)
            return masks, grid, pred.mask_grid_transform(hw, spacing)

        job = _Job(res, z, k, version)
        self._prep = work()
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

    def _layer_geometry(self, z: int, transform):
        """napari (scale, translate) of a (1, M, M) mask-grid array on slice z of the image layer."""
        image = self.ex._results_image
        (sy, sx), (ty, tx) = transform
        s, t = np.asarray(image.scale, float)[-3:], np.asarray(image.translate, float)[-3:]
        scale = (s[0], s[1] * sy, s[2] * sx)
        translate = (t[0] + z * s[0], t[1] + ty * s[1], t[2] + tx * s[2])
        return scale, translate

    def _show_edit(self, job: _Job, masks, grid: np.ndarray, transform) -> None:
        from napari.utils.colormaps import DirectLabelColormap

        res = job.results
        if masks is not None:
            res.store_scale(job.z, job.k, masks, job.version)
        if res is not self.ex.results:
            self._status.value = "the results changed meanwhile: Edit again"
            return
        cid = res.target_class
        data = (np.asarray(grid, bool) * cid).astype(np.uint8)[None]
        scale, translate = self._layer_geometry(job.z, transform)
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
                                         colormap=DirectLabelColormap(color_dict=colors),
                                         metadata={"genseg_edit": {"z": job.z, "k": job.k}})
            self.edit_layer = lay
        lay.metadata["genseg_edit"] = {"z": job.z, "k": job.k}
        self._edit = job
        # the View tab shows the fine consensus under the coarse edit
        if self.ex._show.value == "scales":
            self.ex._show.value = "consensus"
        self.viewer.layers.selection.active = lay
        lay.selected_label = cid
        pk = int(self.ex.predictor.cfg.patch_nums[job.k - 1])
        lay.brush_size = max(1, math.ceil(data.shape[-1] / pk / 2))  # half a scale-k cell
        lay.mode = "paint"
        M = data.shape[-1]
        self._status.value = (f"slice {job.z}, scale {job.k} ({pk}x{pk} cells on the {M}x{M} mask grid): "
                              "paint / erase, add clicks, then Redraw finer scales")

    # ------------------------------------------------------------------ prompts
    def add_clicks(self, *_):
        """Add (or select) the clicks Points layer on the image's grid, in add mode."""
        image = self.ex._results_image or self.ex._image.value
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
        if lay is None:
            return
        lay.feature_defaults = {"positive": bool(self._sign.value)}  # the colour follows the feature

    def clicks(self, z: int) -> list[tuple[int, int, bool]]:
        """The clicks on slice z as (y, x, positive) image pixels (others are ignored)."""
        lay, image = self.clicks_layer, self.ex._results_image
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
        refused (no edit layer, nothing run, a job running, a bad box)."""
        from napari.qt.threading import thread_worker

        ex = self.ex
        if self.worker is not None or self._prep is not None or ex.worker is not None:
            return None
        job, lay = self._edit, self.edit_layer
        if job is None or lay is None or lay not in self.viewer.layers:
            notify_error("Edit at scale k first (the edit layer holds the corrected coarse mask).")
            return None
        res, pred, vol = ex.results, ex.predictor, ex.volume
        cons = ex._layer("consensus")
        if res is not job.results or job.z not in res.tokens or cons is None:
            notify_error("the results this edit was made from are gone: Edit at scale k again")
            return None
        z, k = job.z, job.k
        try:
            box = self._box(z)
        except InputError as exc:
            notify_error(exc)
            return None
        self.sync()
        edited = np.asarray(lay.data[0]) != 0  # a copy: the reader may keep painting meanwhile
        clicks = self.clicks(z)
        previous = np.asarray(cons.data[z]) == res.target_class
        slice_hu = np.asarray(vol.data[z], np.float32)
        opts = dict(spacing_yx=tuple(vol.spacing[1:]), edited_on="mask", target_class=res.target_class,
                    n_samples=res.n, box=box, clicks=clicks, previous=previous,
                    threshold=float(ex._threshold.value))

        @thread_worker(start_thread=False, ignore_errors=True)
        def work():
            return pred.redraw(slice_hu, edited, k, **opts)

        self._cancelled = False
        self.worker = work()
        self.worker.returned.connect(lambda r, job=job: self._apply(job, r))
        self.worker.errored.connect(lambda exc: self._failed(exc, "Redraw failed"))
        self.worker.finished.connect(self._redraw_finished)
        where = "in the box" if box is not None else "on the whole slice"
        self._status.value = (f"redrawing scales {k + 1}..{res.num_scales} of slice {z} {where} "
                              f"({len(clicks)} click(s), N = {res.n})...")
        self._busy(True)
        self.worker.start()
        return self.worker

    def cancel(self) -> None:
        """Drop the running redraw: nothing of it will be written."""
        if self.worker is not None:
            self._cancelled = True
            self.worker.quit()
            self._status.value = "redraw cancelled: nothing changed"

    def _busy(self, busy: bool) -> None:
        self._edit_btn.enabled = self._redraw_btn.enabled = not busy
        self.ex._run.enabled = not busy and self.ex.worker is None
        self.ex._cancel.enabled = busy or self.ex.worker is not None

    def _redraw_finished(self):
        self.worker = None
        self._busy(False)

    def _failed(self, exc, context: str) -> None:
        notify_error(exc, context)
        line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        self._status.value = f"{context.lower()}: {line} (nothing changed)"

    def _apply(self, job: _Job, r) -> None:
        """Write a redraw's result (GUI thread): see the module docstring."""
        ex, res = self.ex, self.ex.results
        cons = ex._layer("consensus")
        if self._cancelled:
            return
        if res is not job.results or job.z not in res.tokens or cons is None:
            self._status.value = "the results changed during the redraw: nothing written"
            return
        z, cid = job.z, res.target_class
        y0, y1, x0, x1 = r.box
        h, w = res.shape[1:]
        inside = np.zeros((h, w), bool)
        inside[y0:y1, x0:x1] = True
        self.sync()
        old = np.asarray(cons.data[z]).copy()
        new = old.copy()
        fg = np.asarray(r.consensus, bool) & inside
        new[inside & (old == cid) & ~fg] = 0
        new[fg] = cid
        whole = (y0, y1, x0, x1) == (0, h, 0, w)
        before = res.state(z)
        after = res.redrawn(z, np.asarray(r.samples).sum(0, dtype=np.uint8), r.tokens, None if whole else r.box)
        self._history.setdefault(z, []).append(_Applied(res, z, old, new, before, after))
        self._set_state(res, z, after)
        idx = np.nonzero(new != old)
        if idx[0].size:
            with cons.block_history():
                cons.data_setitem((np.full(idx[0].size, z), idx[0], idx[1]), new[idx])
        self._refresh_slice(z)
        self.last = r
        full = res.run_seconds.get(z)
        emb = "embedding reused" if r.embedding_cached else "image re-embedded"
        timing = (f"redraw from scale {r.from_scale}: {r.seconds:.2f} s"
                  + (f" (full run {full:.2f} s/slice)" if full is not None else "") + f", {emb}")
        self._status.value = (f"{timing}. Slice {z}: {idx[0].size} pixel(s) changed"
                              f"{' in the box' if not whole else ''}; Ctrl+Z on the consensus undoes it.")
        if self.edit_layer is not None and self.edit_layer in self.viewer.layers:
            self.edit_layer.visible = False
        ex._show.value = "consensus"
        self.viewer.layers.selection.active = cons
        overlay = ex.text_overlay()
        overlay.text = f"redraw from scale {r.from_scale}: {r.seconds:.1f} s" + (
            f" (full run {full:.1f} s)" if full is not None else "")
        overlay.visible = True

    # ------------------------------------------------------------------ undo / redo
    def _refresh_slice(self, z: int) -> None:
        """Variability and the shown sample / scale of slice z after its results changed."""
        ex, res = self.ex, self.ex.results
        var = ex._layer("variability")
        if var is not None:
            var.data[z] = res.disagreement([z], float(ex._threshold.value))[0]
            var.refresh()
        if ex._show.value != "consensus":
            ex._show_slice()

    def _set_state(self, res, z: int, st) -> None:
        res.set_state(z, st)
        self._versions[z] = res.version[z]

    def watch(self, cons) -> None:
        """Call :meth:`sync` whenever ``cons`` (the consensus layer) is redrawn on screen: napari's
        Labels undo / redo rewrite the data and refresh the layer, emitting no edit event."""
        if self._watched is cons:
            return
        if self._watched is not None:
            self._watched.events.thumbnail.disconnect(self._on_refresh)
        self._watched = cons
        cons.events.thumbnail.connect(self._on_refresh)

    def _on_refresh(self, *_):
        if self._history:
            self.sync()

    def sync(self) -> None:
        """Match each redrawn slice's results to what its consensus layer shows: after Ctrl+Z of a
        redraw the slice holds what that redraw found (``prior``) and gets the results from before
        it; after a redo, what it wrote and the results after it. Other edits leave them be."""
        res, cons = self.ex.results, self.ex._layer("consensus")
        for z, entries in list(self._history.items()):
            entries[:] = [e for e in entries if e.results is res]
            if (not entries or cons is None or z not in res.tokens
                    or res.version.get(z) != self._versions.get(z)):  # re-run since: not ours to undo
                self._history.pop(z, None)
                self._versions.pop(z, None)
                self._history.pop(z, None)
                continue
            shown = np.asarray(cons.data[z])
            for e in reversed(entries):
                target = (e.after if np.array_equal(shown, e.written)
                          else e.before if np.array_equal(shown, e.prior) else None)
                if target is not None:
                    if not _same_state(res.state(z), target):
                        self._set_state(res, z, target)
                        self._refresh_slice(z)
                    break


def _same_state(a, b) -> bool:
    """Whether two ``SliceState`` hold the same votes and the very same token arrays."""
    return (a.tokens is b.tokens and len(a.regions) == len(b.regions)
            and all(ra[0] == rb[0] and ra[1] is rb[1] for ra, rb in zip(a.regions, b.regions))
            and np.array_equal(a.votes, b.votes))
