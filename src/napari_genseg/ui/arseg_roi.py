"""The AR-Seg explorer's "Box" tab: region-of-interest mode in the viewer.

The user draws a rectangle in a Shapes layer ("Draw a box" adds one, in rectangle mode, on the
image's grid) around a structure; "Run in box" takes the last rectangle (the selected one if any),
turns it into a voxel box of the image (pixels whose centres lie inside it; on the rectangle's
slice, ± "slices ±" slices) and runs ``predictors.arseg_roi.ArSegRoiPredictor`` with a
crop-trained checkpoint (the "ROI checkpoint" field, or the shipped ``arseg_roi_demo``) in a worker
thread: crops at the checkpoint's field of view, N samples, their consensus, variability and
scale progression, all mapped back onto the box's own voxels. Then, on the GUI thread:

* the consensus is pasted into the "paste into" Labels layer (default: the explorer's
  ``I [arseg] consensus``) as ONE undo step (``Labels.block_history`` + one ``data_setitem``):
  inside the box the target class becomes the consensus (its voxels outside the consensus go to
  0, other classes' voxels outside it are kept); nothing outside the box changes. The class id
  is found by name in the layer's ``class`` feature (e.g. ``liver_lesion`` = 6 in the phantom's
  labels), else the checkpoint's id;
* the results are shown in place, as small layers on the box (translated onto it, same scale as
  the image): ``I [roi] consensus``, ``I [roi] variability`` (% of the N samples disagreeing with
  the consensus, inferno with 0 transparent), ``I [roi] sample k/N`` and ``I [roi] scale k/K``
  (the consensus after scale k; Play animates it). "show" makes one of them visible.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from magicgui.widgets import ComboBox, Container, FileEdit, Label, PushButton, Slider, SpinBox, create_widget

from ..errors import InputError
from ..predictors.uncertainty import max_disagreement_percent
from ..roi import RoiBox, RoiError
from ._run import add_class_labels, load_model, notify_error

__all__ = ["RoiPanel", "box_from_shape", "ROI_SHOW"]

#: what the Box tab's "show" can make visible
ROI_SHOW = ("consensus", "variability", "sample", "scales")


def box_from_shape(vertices_data: np.ndarray, shape, current_z: int, half_depth: int = 0) -> RoiBox:
    """A shape's vertices in the image's data coordinates ((k, 3) z, y, x or (k, 2) y, x) -> the
    voxel box of the pixels whose centres lie inside its bounding rectangle, on the shape's slice
    (rounded mean z; ``current_z`` for 2-D vertices) ± ``half_depth`` slices, clipped to ``shape``.
    Raises ``RoiError`` when no pixel centre is inside."""
    v = np.asarray(vertices_data, dtype=np.float64)
    nz, ny, nx = (int(s) for s in shape)
    z = int(round(float(v[:, 0].mean()))) if v.shape[1] == 3 else int(current_z)
    yx = v[:, -2:]
    y0, x0 = (int(math.ceil(a - 1e-6)) for a in yx.min(0))
    y1, x1 = (int(math.floor(b + 1e-6)) + 1 for b in yx.max(0))
    y0, x0, y1, x1 = max(y0, 0), max(x0, 0), min(y1, ny), min(x1, nx)
    if y1 <= y0 or x1 <= x0 or not 0 <= z < nz:
        raise RoiError("the box holds no pixel of the image: draw it over the image")
    return RoiBox(max(z - half_depth, 0), min(z + half_depth + 1, nz), y0, y1, x0, x1)


class RoiPanel(Container):
    """The "Box" tab of :class:`~napari_genseg.ui.arseg_explorer.ArSegExplorer` (see the module
    docstring). It reads the explorer's image, device, precision, N, seed and threshold."""

    def __init__(self, explorer):
        super().__init__()
        import napari
        from qtpy.QtCore import QTimer

        self.ex = explorer
        self.viewer = explorer.viewer
        self.worker = None
        self.result = None  # predictors.arseg_roi.RoiResult of the last run
        self.progression = None  # (nz, K, h, w) uint8 votes after each scale
        self.masks = None  # (nz, N, h, w) bool full-scale samples
        self.predictor = None  # the ArSegRoiPredictor of the last result (the Edit tab redraws with it)
        self.volume = None  # the Volume it ran on
        self._image_layer = None
        self._layers: dict[str, object] = {}
        self._shapes = create_widget(annotation=napari.layers.Shapes, label="box layer")
        self._draw = PushButton(text="Draw a box")
        self._paste_to = create_widget(annotation=napari.layers.Labels, label="paste into",
                                       options={"nullable": True})
        self._checkpoint = FileEdit(label="ROI checkpoint", mode="r", filter="*.safetensors",
                                    tooltip="a crop-trained AR-Seg checkpoint (empty: the shipped arseg_roi_demo)")
        self._depth = SpinBox(label="slices ±", min=0, max=32, value=0,
                              tooltip="also run this many slices above and below the box's slice")
        self._run = PushButton(text="Run in box")
        self._show = ComboBox(label="show", choices=list(ROI_SHOW), value="variability")
        self._sample = SpinBox(label="sample #", min=1, max=32, value=1)
        self._scale = Slider(label="scale", min=1, max=8, value=8)
        self._play = PushButton(text="Play")
        self._status = Label(value="draw a box around a lesion, then Run in box")
        self._status.native.setWordWrap(True)
        buttons = Container(widgets=[self._draw, self._run, self._play], layout="horizontal", labels=False)
        buttons.margins = (0, 0, 0, 0)
        self.extend([self._shapes, self._paste_to, self._checkpoint, self._depth, buttons,
                     self._show, self._sample, self._scale, self._status])
        self._timer = QTimer()
        self._timer.timeout.connect(self._tick)
        self._draw.changed.connect(self.draw_box)
        self._run.changed.connect(self.run)
        self._show.changed.connect(self._on_show)
        self._sample.changed.connect(self._on_sample)
        self._scale.changed.connect(self._on_scale)
        self._play.changed.connect(self.toggle_play)

    # ------------------------------------------------------------------ the box
    def draw_box(self, *_):
        """Add (or select) the "ROI box" Shapes layer on the image's grid in rectangle mode."""
        image = self.ex._image.value
        if image is None:
            notify_error("Choose an image layer first.")
            return None
        name = f"{image.name} ROI box"
        lay = self.viewer.layers[name] if name in self.viewer.layers else self.viewer.add_shapes(
            ndim=image.data.ndim, name=name, scale=image.scale, translate=image.translate, edge_color="yellow",
            edge_width=1.5, face_color="transparent")
        self.viewer.layers.selection.active = lay
        lay.mode = "add_rectangle"
        self._shapes.reset_choices()
        self._shapes.value = lay
        return lay

    def current_box(self) -> RoiBox:
        """The voxel box of the box layer's selected (else last) shape. Raises ``InputError``."""
        image, shapes = self.ex._image.value, self._shapes.value
        if image is None:
            raise InputError("choose an image layer first")
        if shapes is None or len(shapes.data) == 0:
            raise InputError("draw a box first (Draw a box, then drag a rectangle over the structure)")
        sel = sorted(shapes.selected_data)
        verts = np.asarray(shapes.data[sel[-1] if sel else -1], dtype=np.float64)
        world = np.stack([shapes.data_to_world(v) for v in verts])
        data = np.stack([image.world_to_data(w) for w in world])
        return box_from_shape(data[:, -3:] if data.shape[1] >= 3 else data, image.data.shape, self.ex.current_slice(),
                              int(self._depth.value))

    def _roi_checkpoint(self):
        from ..predictors.arseg_roi import ROI_DEMO, shipped_roi_checkpoint

        v = self._checkpoint.value
        if v is not None and str(v) not in ("", ".") and not Path(v).is_dir():
            return str(v)
        p = shipped_roi_checkpoint()
        if p is None:
            raise InputError(f"no ROI checkpoint: choose one (the shipped {ROI_DEMO} is not installed)")
        return str(p)

    # ------------------------------------------------------------------ run
    def run(self, *_):
        """Run the box (returns the worker, or None when the input was refused)."""
        from napari.qt.threading import thread_worker

        from ..predictors.arseg_roi import ArSegRoiPredictor
        from .layers import volume_from_layer

        if self.worker is not None or self.ex.worker is not None:
            return None
        try:
            box = self.current_box()
            image = self.ex._image.value
            vol = volume_from_layer(image.data, image.metadata, image.scale, image.translate)
            ckpt = load_model("arseg", self._roi_checkpoint())
            names = list(ckpt.class_names)
            target = names.index("liver_lesion") if "liver_lesion" in names else 1
            pred = ArSegRoiPredictor.from_checkpoint(ckpt, device=self.ex._device.value,
                                                     precision=self.ex._precision.value,
                                                     n_samples=int(self.ex._samples.value), seed=int(self.ex._seed.value),
                                                     target_class=target)
        except InputError as exc:
            notify_error(exc)
            return None
        self._image_layer, self._class_names = image, names
        data = vol.data

        @thread_worker(start_thread=False, ignore_errors=True)
        def work():
            res = pred.run(data, vol.spacing, box)
            prog, masks = zip(*(pred.decode_progression(res.tokens[i], res.crop, box) for i in range(box.shape[0])))
            return res, np.stack(prog), np.stack(masks), pred, vol

        self.worker = work()
        self.worker.returned.connect(self._on_result)
        self.worker.errored.connect(lambda exc: (notify_error(exc, "AR-Seg box failed"),
                                                 setattr(self._status, "value", f"failed: {exc}")))
        self.worker.finished.connect(self._on_finished)
        self._run.enabled = False
        self._status.value = f"AR-Seg in box {box} (N = {pred.n}, {pred.fov_mm:g} mm field of view)..."
        self.worker.start()
        return self.worker

    def _on_finished(self):
        self.worker = None
        self._run.enabled = True

    def _on_result(self, out):
        res, self.progression, self.masks, self.predictor, self.volume = out
        self.result = res
        thr = float(self.ex._threshold.value)
        n_changed = self.paste(res, thr)
        with self._sample.changed.blocked():
            self._sample.max = res.n
        with self._scale.changed.blocked():
            self._scale.max = self.progression.shape[1]
        self._show_results(thr)
        note = f"; {res.warnings[0]}" if res.warnings else ""
        self._status.value = (f"box {res.box}: {int(res.consensus(thr).sum())} voxels pasted into "
                              f"{self._paste_layer_name} ({n_changed} changed; Ctrl+Z undoes it), "
                              f"{res.elapsed:.1f} s{note}")

    # ------------------------------------------------------------------ paste (one undo step)
    def _target_layer(self):
        lay = self._paste_to.value
        if lay is not None and lay.data.shape == self._image_layer.data.shape:
            return lay
        lay = add_class_labels(self.viewer, self._image_layer, f"{self._image_layer.name} [arseg] consensus",
                               self._class_names)
        self._paste_to.reset_choices()
        self._paste_to.value = lay
        return lay

    def paste(self, res, threshold: float = 0.5) -> int:
        """Write ``res``'s consensus into the target Labels layer inside the box only, as one undo
        step; returns the number of voxels changed."""
        lay, old, new = self.plan_paste(res.consensus(threshold), res.box, res.target_class)
        return self.write_box(lay, res.box, old, new)

    def class_id(self, lay, target_class: int) -> int:
        """The id of the checkpoint's class ``target_class`` in Labels layer ``lay``: found by name
        in its ``class`` feature when there, else ``target_class`` itself."""
        name = self._class_names[target_class]
        cid = target_class
        feats = getattr(lay, "features", None)
        if feats is not None and "class" in getattr(feats, "columns", ()) and name in list(feats["class"]):
            cid = int(list(feats["class"]).index(name))
            if "index" in feats.columns:
                cid = int(list(feats["index"])[cid])
        return cid

    def plan_paste(self, cons: np.ndarray, box, target_class: int):
        """(target Labels layer, its labels in ``box`` now, those labels with ``cons`` pasted): the
        class becomes ``cons`` in the box where it is background or the class (its voxels outside
        ``cons`` go to 0); other classes' voxels are never changed (``predictors.arseg.paste_target``)."""
        lay = self._target_layer()
        self._paste_layer_name = lay.name
        cid = self.class_id(lay, target_class)
        old = np.asarray(lay.data[box.slices]).copy()
        from ..predictors.arseg import paste_target

        return lay, old, paste_target(old, cons, cid)

    @staticmethod
    def write_box(lay, box, old: np.ndarray, new: np.ndarray) -> int:
        """Write ``new`` over ``old`` in ``box`` of Labels layer ``lay`` as ONE undo step
        (``block_history`` + one ``data_setitem``); returns the number of voxels changed."""
        idx = np.nonzero(new != old)
        if idx[0].size:
            origin = (box.z0, box.y0, box.x0)
            full = tuple(i + o for i, o in zip(idx, origin))
            with lay.block_history():
                lay.data_setitem(full, new[idx].astype(lay.data.dtype))
        return int(idx[0].size)

    # ------------------------------------------------------------------ in-place result layers
    def _box_layer(self, key: str, kind: str, data: np.ndarray):
        """The small layer ``key`` on the box (translated onto it), re-used while its shape fits."""
        from .arseg_explorer import variability_colormap

        image, box = self._image_layer, self.result.box
        scale = np.asarray(image.scale)[-3:]
        translate = np.asarray(image.translate)[-3:] + np.array([box.z0, box.y0, box.x0]) * scale
        lay = self._layers.get(key)
        if lay is not None and lay in self.viewer.layers and lay.data.shape == data.shape:
            lay.data = data
            lay.translate = translate
            return lay
        if lay is not None and lay in self.viewer.layers:
            self.viewer.layers.remove(lay)
        base = f"{image.name} [roi] {key}"
        if kind == "image":
            thr = float(self.ex._threshold.value)
            lay = self.viewer.add_image(data, name=base, scale=scale, translate=translate,
                                        colormap=variability_colormap(), opacity=0.85, blending="translucent",
                                        contrast_limits=(0, max_disagreement_percent(thr)),
                                        metadata={"units": "% of the N samples disagreeing with the consensus"})
        else:
            from napari.utils.colormaps import DirectLabelColormap

            from .layers import class_colormap, class_features

            lay = self.viewer.add_labels(data, name=base, scale=scale, translate=translate, opacity=0.6,
                                         features=class_features(self._class_names),
                                         colormap=DirectLabelColormap(color_dict=class_colormap(len(self._class_names))))
        self._layers[key] = lay
        return lay

    def _show_results(self, thr: float) -> None:
        res = self.result
        self._box_layer("consensus", "labels", res.labels(thr))
        self._box_layer("variability", "image", np.round(res.variability(thr)).astype(np.uint8))
        self._write_sample()
        self._write_scale()
        self._on_show()

    def _on_show(self, *_):
        for key, lay in self._layers.items():
            if lay in self.viewer.layers:
                lay.visible = key == self._show.value

    def _on_sample(self, *_):
        self._show.value = "sample"
        self._write_sample()

    def _on_scale(self, *_):
        self._show.value = "scales"
        self._write_scale()

    def _write_sample(self) -> None:
        if self.result is None:
            return
        k = min(int(self._sample.value), self.result.n) - 1
        lay = self._box_layer("sample", "labels", self.masks[:, k].astype(np.uint8) * self.result.target_class)
        lay.name = f"{self._image_layer.name} [roi] sample {k + 1}/{self.result.n}"

    def _write_scale(self) -> None:
        if self.result is None:
            return
        res, K = self.result, self.progression.shape[1]
        k = min(int(self._scale.value), K)
        cons = self.progression[:, k - 1].astype(np.float32) / res.n > float(self.ex._threshold.value)
        lay = self._box_layer("scales", "labels", cons.astype(np.uint8) * res.target_class)
        lay.name = f"{self._image_layer.name} [roi] scale {k}/{K}"

    # ------------------------------------------------------------------ animation
    def step_scale(self):
        """Next scale (after the last: the first again)."""
        k = int(self._scale.value)
        self._scale.value = 1 if k >= self._scale.max else k + 1

    def _tick(self):
        self.step_scale()

    def toggle_play(self, *_):
        if self._timer.isActive():
            self._timer.stop()
            self._play.text = "Play"
        elif self.result is not None:
            self._show.value = "scales"
            self._timer.start(int(1000 / max(int(self.ex._fps.value), 1)))
            self._play.text = "Pause"
