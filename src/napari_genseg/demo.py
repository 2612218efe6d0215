"""The main job: open a CT (default: the built-in phantom), run the default model, show or save.

``genseg demo`` opens napari with the plugin docked and the result shown; ``--headless`` writes
the mask (NIfTI on the source geometry) and a PNG overlay of three axial slices instead.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from .preprocessing import window_limits

__all__ = ["run_demo", "overlay_png", "demo_volume"]


def demo_volume(path: str | None):
    """The CT to run on: ``path`` or the built-in phantom (with its reference labels)."""
    if path:
        from .io import load_volume

        return load_volume(path), None, Path(path).name
    from .phantom import make_phantom

    ph = make_phantom(seed=0)
    vol = ph.to_volume()
    return vol, ph, "phantom"


def overlay_png(path: Path, image: np.ndarray, labels: np.ndarray, zs: list[int], window="abdomen") -> Path:
    """Side-by-side axial slices: CT in the window, labels blended in fixed class colours."""
    import imageio.v3 as iio

    from .ui.layers import class_colormap  # pure data; no napari import

    lo, hi = window_limits(window)
    colors = class_colormap(int(labels.max()) + 1)
    tiles = []
    for z in zs:
        g = np.clip((image[z].astype(np.float32) - lo) / (hi - lo), 0, 1)
        rgb = np.repeat(g[..., None], 3, -1)
        for k in range(1, int(labels.max()) + 1):
            m = labels[z] == k
            if m.any():
                rgb[m] = 0.55 * rgb[m] + 0.45 * np.array(colors[k][:3])
        tiles.append((rgb * 255).astype(np.uint8))
        tiles.append(np.zeros((rgb.shape[0], 4, 3), np.uint8))
    img = np.concatenate(tiles[:-1], axis=1)
    scale = max(1, 384 // img.shape[0])
    img = np.kron(img, np.ones((scale, scale, 1), np.uint8))
    path.parent.mkdir(parents=True, exist_ok=True)
    iio.imwrite(path, img)
    return path


def run_demo(args) -> int:
    from .models.checkpoints import CheckpointError, resolve_model

    vol, phantom, name = demo_volume(args.input)
    try:
        ckpt = resolve_model(args.model)
    except CheckpointError as exc:
        ckpt = None
        reason = str(exc)
    if args.headless:
        if ckpt is None:
            print(f"genseg demo: {reason}", file=sys.stderr)
            return 2
        from .cli import segment_volume
        from .io import write_mask
        from .metrics import evaluate_labels

        res = segment_volume(vol, ckpt, args, name)
        out = Path(args.out)
        mask = write_mask(out / f"{name.split('.')[0]}_{ckpt.family}_mask.nii.gz", res.labels, like=vol)
        n = vol.shape[0]
        png = overlay_png(out / f"{name.split('.')[0]}_{ckpt.family}_overlay.png", vol.data, res.labels,
                          [n // 4, n // 2, (3 * n) // 4])
        print(f"mask: {mask}\noverlay: {png}\n{len(res.z)} slices at {res.slices_per_second:.1f} slices/s")
        if phantom is not None:
            ref = np.zeros_like(phantom.labels)
            for i, cname in enumerate(ckpt.class_names):
                if cname in phantom.class_names and i > 0:
                    ref[phantom.labels == phantom.class_names.index(cname)] = i
            scores = evaluate_labels(res.labels, ref, vol.spacing,
                                     {i: c for i, c in enumerate(ckpt.class_names) if i > 0})
            for cname, m in scores.items():
                print(f"phantom {cname}: Dice {m['dice']:.3f}  HD95 {m['hd95_mm']:.1f} mm")
        return 0

    import napari

    from .ui.layers import image_layer_data

    viewer = napari.Viewer(title="napari-genseg demo")
    data, kwargs, _ = image_layer_data(vol, name)
    viewer.add_image(data, **kwargs)
    _, widget = viewer.window.add_plugin_dock_widget("napari-genseg", "Segment CT")
    if ckpt is not None:
        widget._model.value = args.model
        widget._device.value = args.device if args.device in widget._device.choices else "auto"
        widget.run()
    else:
        from napari.utils.notifications import show_warning

        show_warning(f"{reason} The dock is open; choose a checkpoint to run.")
    napari.run()
    return 0
