"""AR-Seg explorer dock: run AR-Seg, animate the coarse-to-fine scales, browse samples, see variability.

Layers it manages for image ``I``:

* ``I [arseg] consensus`` (Labels): mean of the N sample masks > threshold; the threshold slider
  updates it live on every slice that was run (each change is one undo step);
* ``I [arseg] variability`` (Image, inferno-like ramp with 0 transparent, 0–50 %): percentage of samples that disagree with the
  consensus, min(v, N − v) / N (0 = all samples agree, 50 % = an even split);
* ``I [arseg] sample`` (Labels): sample k of the current slice, decoded on demand from its tokens;
* ``I [arseg] scale`` (Labels): the consensus of f̂_k decoded after scale k (k = 1..8) on the
  current slice; play / pause / step / loop at a chosen speed; the scale index is shown in the
  layer name and in the canvas text overlay.

"show" toggles which of consensus / sample / variability is visible. Export writes the scale
progression of the current slice as an animated GIF, an MP4 (needs imageio-ffmpeg) or a PNG strip.
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

from ..arseg_engine import consensus_from_votes, variability_from_votes
from ..device import PRECISIONS
from ..engine import make_predictor, parse_slices, run_volume
from ..models import registry
from ..preprocessing import window_limits
from ._run import LayerEdit, add_class_labels, notify_error
from .layers import volume_from_layer

__all__ = ["ArSegExplorer", "render_progression_frames", "save_progression"]


def render_progression_frames(image2d: np.ndarray, scale_means: np.ndarray, threshold: float = 0.5,
                              window: str = "abdomen", colour=(0.95, 0.35, 0.2), upscale: int = 3) -> list[np.ndarray]:
    """One RGB uint8 frame per scale: the windowed CT slice, the scale-k consensus blended in,
    and 'scale k/K' written in the corner."""
    from PIL import Image, ImageDraw

    lo, hi = window_limits(window)
    g = np.clip((image2d.astype(np.float32) - lo) / (hi - lo), 0, 1)
    base = np.repeat(g[..., None], 3, -1)
    frames = []
    K = scale_means.shape[0]
    for k in range(K):
        rgb = base.copy()
        m = scale_means[k] > threshold
        rgb[m] = 0.5 * rgb[m] + 0.5 * np.asarray(colour)
        img = Image.fromarray((rgb * 255).astype(np.uint8)).resize(
            (rgb.shape[1] * upscale, rgb.shape[0] * upscale), Image.NEAREST)
        ImageDraw.Draw(img).text((6, 4), f"scale {k + 1}/{K}", fill=(255, 255, 0))
        frames.append(np.asarray(img))
    return frames


def save_progression(path: str | Path, frames: list[np.ndarray], fps: float = 2.0) -> Path:
    """.gif (animated, looping), .mp4 (imageio-ffmpeg) or .png (a horizontal strip); atomic."""
    import imageio.v3 as iio

    from ..io.atomic import atomic_path

    path = Path(path)
    ext = "".join(path.suffixes[-1:]).lower()
    with atomic_path(path) as tmp:
        if ext == ".gif":
            iio.imwrite(tmp, np.stack(frames), extension=".gif", duration=int(1000 / fps), loop=0)
        elif ext == ".png":
            gap = np.zeros((frames[0].shape[0], 6, 3), np.uint8)
            strip = [x for f in frames for x in (f, gap)][:-1]
            iio.imwrite(tmp, np.concatenate(strip, axis=1), extension=".png")
        elif ext == ".mp4":
            try:
                import imageio_ffmpeg  # noqa: F401
            except ImportError:
                raise RuntimeError("MP4 export needs imageio-ffmpeg (pip install imageio-ffmpeg); use .gif or .png") from None
            iio.imwrite(tmp, np.stack(frames), extension=".mp4", fps=fps)
        else:
            raise ValueError(f"{path.name}: export as .gif, .mp4 or .png")
    return path


def variability_colormap():
    """Inferno-like ramp whose zero is transparent, so agreement leaves the CT visible."""
    from napari.utils.colormaps import Colormap

    return Colormap(
        colors=[[0.0, 0.0, 0.0, 0.0], [0.34, 0.06, 0.43, 0.55], [0.73, 0.21, 0.33, 0.8],
                [0.98, 0.55, 0.04, 0.95], [0.99, 1.0, 0.64, 1.0]],
        name="genseg_variability", display_name="variability (inferno, 0 transparent)",
    )


class ArSegExplorer(Container):
    def __init__(self, napari_viewer):
        super().__init__(labels=True)
        import napari
        from qtpy.QtCore import QTimer

        self.viewer = napari_viewer
        self.worker = None
        self._edit = None
        self.predictor = None
        self.volume = None
        self.votes = None  # (Z, H, W) uint8
        self.tokens: dict[int, np.ndarray] = {}
        self.n = 0
        self._progression: dict[int, np.ndarray] = {}
        self._layers: dict[str, object] = {}
        self._scale_k = 8

        self._image = create_widget(annotation=napari.layers.Image, label="image")
        names = [e.name for e in registry.list_configs("arseg")] if "arseg" in {f.name for f in registry.list_families()} else []
        self._model = ComboBox(label="model", choices=(["arseg"] + names) if names else [],
                               tooltip="arseg = shipped demo weights; a config needs a checkpoint")
        self._checkpoint = FileEdit(label="checkpoint", mode="r", filter="*.safetensors")
        self._device = ComboBox(label="device", choices=["auto", "cpu", "cuda", "mps"], value="auto")
        self._precision = ComboBox(label="precision", choices=list(PRECISIONS), value="auto")
        self._samples = SpinBox(label="samples N", min=1, max=32, value=16)
        # choices come from a callable: napari calls reset_choices() on docked widgets whenever
        # layers change, which would reset a plain list to the constructor's (empty) one
        self._target_list: list[tuple[str, int]] = [("foreground", 1)]
        self._target = ComboBox(label="target class", choices=lambda _w: self._target_list,
                                tooltip="the class AR-Seg segments (AdaLN conditioning)")
        self._seed = SpinBox(label="seed", min=0, max=2**31 - 1, value=0)
        self._batch = SpinBox(label="slices per batch", min=1, max=32, value=2)
        self._scope = RadioButtons(label="slices", choices=["current", "range", "all"], value="current",
                                   orientation="horizontal")
        self._start = SpinBox(label="from slice", min=0, max=100000, visible=False)
        self._stop = SpinBox(label="to slice (incl.)", min=0, max=100000, visible=False)
        self._run = PushButton(text="Run AR-Seg")
        self._cancel = PushButton(text="Cancel", enabled=False)
        self._progress = ProgressBar(label="progress", min=0, max=100, value=0)
        self._status = Label(value="")
        self._threshold = FloatSlider(label="consensus >", min=0.05, max=0.95, step=0.05, value=0.5)
        self._show = RadioButtons(label="show", choices=["consensus", "sample", "variability"],
                                  value="consensus", orientation="horizontal")
        self._sample = SpinBox(label="sample #", min=1, max=32, value=1)
        self._legend = Label(value="variability: % of samples disagreeing with the consensus (0-50 %)")
        self._scale = Slider(label="scale", min=1, max=8, value=8)
        self._play = PushButton(text="Play")
        self._step = PushButton(text="Step")
        self._loop = CheckBox(text="loop", value=True)
        self._fps = SpinBox(label="speed (scales/s)", min=1, max=20, value=2)
        self._export_path = FileEdit(label="export to", mode="w", filter="*.gif *.png *.mp4",
                                     value="arseg_scales.gif")
        self._export = PushButton(text="Export scale progression")
        self.extend([self._image, self._model, self._checkpoint, self._device, self._precision,
                     self._target, self._samples, self._seed, self._batch, self._scope, self._start, self._stop,
                     self._run, self._cancel, self._progress, self._status, self._threshold, self._show,
                     self._sample, self._legend, self._scale, self._play, self._step, self._loop,
                     self._fps, self._export_path, self._export])
        self._timer = QTimer()
        self._timer.timeout.connect(self._tick)
        self._run.changed.connect(self.run)
        self._cancel.changed.connect(self.cancel)
        self._model.changed.connect(self._refresh_targets)
        self._checkpoint.changed.connect(self._refresh_targets)
        self._refresh_targets()
        self._scope.changed.connect(self._on_scope)
        self._threshold.changed.connect(self._on_threshold)
        self._show.changed.connect(self._on_show)
        self._sample.changed.connect(lambda *_: self._update_sample())
        self._scale.changed.connect(lambda *_: self._update_scale())
        self._play.changed.connect(self.toggle_play)
        self._step.changed.connect(self.step_scale)
        self._fps.changed.connect(lambda *_: self._timer.setInterval(int(1000 / self._fps.value)))
        self._export.changed.connect(self.export)
        self.viewer.dims.events.current_step.connect(self._on_slice)
        self.viewer.layers.events.inserted.connect(lambda e: self._image.reset_choices())
        self.viewer.layers.events.removed.connect(lambda e: self._image.reset_choices())

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

    # ------------------------------------------------------------------ run
    def run(self, *_):
        from napari.qt.threading import thread_worker

        from ..models.checkpoints import CheckpointError, resolve_model

        if self.worker is not None:
            return None
        image = self._image.value
        if image is None:
            notify_error("Choose an image layer first.")
            return None
        try:
            vol = volume_from_layer(image.data, image.metadata, image.scale, image.translate)
            if self._scope.value == "range":
                if self._stop.value < self._start.value:
                    raise ValueError(f"empty slice range {self._start.value}..{self._stop.value}")
                spec, cur = (int(self._start.value), int(self._stop.value) + 1), None
            else:
                spec, cur = self._scope.value, self.current_slice()
            zs = parse_slices(spec, vol.shape[0], cur)
            ckpt = resolve_model(self._model.value or "arseg", self._checkpoint_path())
            if registry.get_family(ckpt.family).kind != "arseg":
                raise ValueError(f"{ckpt.family} is not an AR-Seg checkpoint; use the Segment CT dock")
            pred = make_predictor(ckpt, device=self._device.value, precision=self._precision.value,
                                  n_samples=int(self._samples.value), seed=int(self._seed.value),
                                  target_class=int(self._target.value or 1))
        except (ValueError, KeyError, CheckpointError) as exc:
            notify_error(str(exc).strip("'\""))
            return None
        new_grid = self.volume is None or self.volume.shape != vol.shape or self.n != pred.n
        self.volume, self.predictor, self.n = vol, pred, pred.n
        if new_grid or self.votes is None:
            self.votes = np.zeros(vol.shape, np.uint8)
            self.tokens = {}
        self._progression.clear()
        self._sample.max = self.n
        base = f"{image.name} [arseg]"
        names = ckpt.class_names
        self._layers["consensus"] = add_class_labels(self.viewer, image, f"{base} consensus", names)
        if self._layer("variability") is None:
            self._layers["variability"] = self.viewer.add_image(
                np.zeros(vol.shape, np.uint8), name=f"{base} variability", scale=image.scale,
                translate=image.translate, colormap=variability_colormap(), contrast_limits=(0, 50), opacity=0.8,
                blending="translucent", visible=False, metadata={"units": "% of samples disagreeing"})
        self._layers["sample"] = self._layer("sample") or add_class_labels(
            self.viewer, image, f"{base} sample", names, visible=False)
        self._layers["scale"] = self._layer("scale") or add_class_labels(
            self.viewer, image, f"{base} scale", names, opacity=0.6)
        self._edit = LayerEdit(self._layers["consensus"]).begin()

        @thread_worker(start_thread=False)
        def work():
            return (yield from run_volume(pred, vol, zs, batch_size=int(self._batch.value)))

        self.worker = work()
        self.worker.yielded.connect(self._on_progress)
        self.worker.errored.connect(lambda exc: (notify_error(exc, "AR-Seg failed"),
                                                 setattr(self._status, "value", f"failed: {exc}")))
        self.worker.finished.connect(self._on_finished)
        self._run.enabled, self._cancel.enabled = False, True
        self._status.value = f"AR-Seg, N = {self.n}, {len(zs)} slice(s)..."
        self.worker.start()
        return self.worker

    def _on_progress(self, p):
        z = list(p.z)
        self.votes[z] = p.outputs["votes"]
        for zi, t in zip(z, p.outputs["tokens"]):
            self.tokens[zi] = t
        thr = float(self._threshold.value)
        cls = self.predictor.target_class
        if self._edit is not None:
            self._edit.set_slices(z, (consensus_from_votes(self.votes[z], self.n, thr) * cls).astype(np.uint8))
        var = self._layer("variability")
        if var is not None:
            var.data[z] = np.round(200 * variability_from_votes(self.votes[z], self.n)).astype(np.uint8)
            var.refresh()
        self._progress.value = int(round(100 * p.fraction))
        self._status.value = f"{p.done}/{p.total} slices, {p.elapsed / max(p.done, 1):.2f} s/slice"

    def _on_finished(self):
        if self._edit is not None:
            edit, self._edit = self._edit, None
            edit.end()
        worker, self.worker = self.worker, None
        self._run.enabled, self._cancel.enabled = True, False
        if worker is not None and getattr(worker, "abort_requested", False):
            self._status.value = "cancelled; finished slices kept"
        elif not self._status.value.startswith("failed"):
            self._progress.value = 100
            self._status.value = f"done: {len(self.tokens)} slice(s), N = {self.n}"
        self._on_show()
        self._update_sample()
        self._update_scale()

    def cancel(self, *_):
        if self.worker is not None:
            self.worker.quit()

    # ------------------------------------------------------------------ results
    def _on_threshold(self, *_):
        lay = self._layer("consensus")
        if lay is None or not self.tokens or self.worker is not None:
            return
        zs = sorted(self.tokens)
        new = (consensus_from_votes(self.votes[zs], self.n, float(self._threshold.value))
               * self.predictor.target_class).astype(np.uint8)
        edit = LayerEdit(lay).begin()
        try:
            edit.set_slices(zs, new)
        finally:
            edit.end()
        self._update_scale()

    def _on_show(self, *_):
        for key in ("consensus", "sample", "variability"):
            lay = self._layer(key)
            if lay is not None:
                lay.visible = key == self._show.value

    def _on_slice(self, *_):
        self._update_sample()
        self._update_scale()

    def _update_sample(self):
        lay, z = self._layer("sample"), self.current_slice()
        if lay is None or z not in self.tokens:
            return
        k = min(int(self._sample.value), self.n) - 1
        hw = self.volume.shape[1:]
        mask = self.predictor.decode_samples(self.tokens[z][k : k + 1], hw, self.volume.spacing[1:])[0]
        lay.data[:] = 0
        lay.data[z] = mask.astype(np.uint8) * self.predictor.target_class
        lay.name = f"{self._image.value.name} [arseg] sample {k + 1}/{self.n}"
        self._layers["sample"] = lay
        lay.refresh()

    def progression(self, z: int) -> np.ndarray:
        """(K, H, W) mean of the sample masks after each scale, decoded once per slice."""
        if z not in self._progression:
            self._progression[z] = self.predictor.scale_progression(self.tokens[z], self.volume.shape[1:],
                                                                    self.volume.spacing[1:])
        return self._progression[z]

    def _update_scale(self):
        lay, z = self._layer("scale"), self.current_slice()
        if lay is None or z not in self.tokens:
            return
        prog = self.progression(z)
        K = prog.shape[0]
        k = min(int(self._scale.value), K)
        lay.data[:] = 0
        lay.data[z] = (prog[k - 1] > float(self._threshold.value)).astype(np.uint8) * self.predictor.target_class
        lay.name = f"{self._image.value.name} [arseg] scale {k}/{K}"
        self._layers["scale"] = lay
        lay.refresh()
        overlay = self.text_overlay()
        overlay.visible = True
        overlay.text = f"AR-Seg scale {k}/{K}  (slice {z}, N = {self.n})"

    def text_overlay(self):
        """The canvas text overlay (napari >= 0.9: viewer.canvas.overlays['text'])."""
        canvas = getattr(self.viewer, "canvas", None)
        if canvas is not None and "text" in canvas.overlays:
            return canvas.overlays["text"]
        return self.viewer.text_overlay

    def step_scale(self, *_):
        k = int(self._scale.value)
        if k >= self._scale.max:
            if not self._loop.value:
                self.toggle_play(stop=True)
                return
            k = 0
        self._scale.value = k + 1

    def _tick(self):
        self.step_scale()

    def toggle_play(self, *_, stop: bool = False):
        if self._timer.isActive() or stop:
            self._timer.stop()
            self._play.text = "Play"
        else:
            self._timer.start(int(1000 / self._fps.value))
            self._play.text = "Pause"

    def export(self, *_):
        z = self.current_slice()
        if z not in self.tokens:
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
