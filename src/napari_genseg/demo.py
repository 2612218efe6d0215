"""The main job: open a CT (default: the shipped real abdomen CT), run the default model, show or save.

``genseg demo`` opens napari with the CT, the Segment dock and the result; ``--headless`` writes the
mask (NIfTI on the source geometry, with the JSON sidecar ``genseg segment`` writes), prints the
per-class volumes (mL) and 3-D component counts, and writes an overlay PNG: axial slices chosen
where the classes are (from below the lowest class up to the top of the highest), each tile labelled
with its slice number, its z in mm and the orientation letters of its edges, and a legend with the
class colours, names and volumes.

Inputs (``--input``): none = the sample "Abdominal CT (real)" shipped in ``napari_genseg/data``
(TotalSegmentator test data, Apache-2.0); ``phantom`` = the synthetic phantom, whose reference
labels give a Dice per class; anything else = a CT path (NIfTI, DICOM folder/file, DICOMDIR).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .preprocessing import window_limits

__all__ = [
    "run_demo",
    "overlay_png",
    "demo_volume",
    "class_volumes",
    "overlay_slices",
    "view_letters",
    "ClassVolume",
    "PHANTOM",
]

#: ``--input`` value that picks the synthetic phantom (with reference labels)
PHANTOM = "phantom"

_OPPOSITE = {"L": "R", "R": "L", "A": "P", "P": "A", "S": "I", "I": "S"}


def demo_volume(spec: str | None):
    """The CT to run on -> (Volume, Phantom or None, display name, file stem for outputs).

    ``None``: the shipped real sample CT; ``"phantom"``: the synthetic phantom (its reference
    labels come back as the second item); otherwise a path read by the package's reader
    (VolumeReadError, an InputError, for an unreadable one).
    """
    if spec is None:
        from .data import SAMPLE_CT_NAME, sample_ct

        return sample_ct(), None, SAMPLE_CT_NAME, "abdomen_ct"
    if spec == PHANTOM:
        from .phantom import make_phantom

        ph = make_phantom(seed=0)
        return ph.to_volume(), ph, "phantom", "phantom"
    from .io import load_volume

    name = Path(spec).name
    return load_volume(spec), None, name, name.split(".")[0] or "ct"


# ----------------------------------------------------------------------------- report
@dataclass(frozen=True)
class ClassVolume:
    """One class of a label volume: id, name, voxel count, volume (mL) and 3-D connected
    components (26-connectivity: voxels touching by a face, edge or corner are one component)."""

    index: int
    name: str
    voxels: int
    ml: float
    components: int


def class_volumes(labels: np.ndarray, spacing, class_names) -> list[ClassVolume]:
    """Volume in mL (voxels × sz·sy·sx mm³ / 1000) and 3-D component count of every foreground
    class of ``labels`` ((z, y, x) integer array) named in ``class_names`` (index 0 = background,
    skipped), measured by :func:`napari_genseg.postprocessing.measure` (the same counting as the
    post-processing report). Classes absent from ``labels`` are listed with 0 mL and 0 components."""
    from .postprocessing import measure

    rep = measure(labels, list(class_names), spacing)
    return [ClassVolume(c.label, c.name, c.voxels, c.volume_ml, c.components_after) for c in rep.classes]


def _volume_table(vols: list[ClassVolume], zs) -> str:
    lo, hi = min(zs), max(zs)
    width = max([len("class")] + [len(v.name) for v in vols])
    lines = [f"per-class result on slices {lo}..{hi} ({len(zs)} slices; 3-D components, 26-connected):",
             f"  {'class':<{width}}  {'volume':>10}  components"]
    for v in vols:
        lines.append(f"  {v.name:<{width}}  {v.ml:>7.1f} mL  {v.components:>10}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- overlay
def view_letters(vol) -> dict[str, str]:
    """Patient-direction letters at the edges of an axial tile ``vol.data[z]`` shown with rows
    down and columns right: ``{"left", "right", "top", "bottom"}`` -> one of R/L/A/P/S/I.

    Derived from the volume's geometry, not assumed: the RAS affine of the display array's voxel
    axes is the source affine composed with the reader's reorientation (``source_affine`` and
    ``ornt``), or :attr:`Volume.display_affine_ras` when there is no source affine or the grid was
    resampled. Column index x points to ``right``, row index y to ``bottom``. For a volume read by
    the package (LPS display axes) that is R | L, A on top, P at the bottom: radiological.
    """
    import nibabel as nib
    import nibabel.orientations as no

    if vol.source_affine is not None and vol.ornt is not None and vol.source_shape is not None:
        aff = np.asarray(vol.source_affine, dtype=np.float64) @ no.inv_ornt_aff(vol.ornt, vol.source_shape)
    else:
        aff = vol.display_affine_ras
    x_code, y_code, _ = nib.aff2axcodes(aff)
    return {"left": _OPPOSITE[x_code], "right": x_code, "top": _OPPOSITE[y_code], "bottom": y_code}


def overlay_slices(labels: np.ndarray, segmented, max_tiles: int = 8, min_voxels: int = 20) -> list[int]:
    """Axial slices to show, ascending (inferior to superior in display order), chosen by where
    the classes are among the ``segmented`` slice indices ((z, y, x) ``labels``):

    1. landmarks, in this order of priority: the top slice of each class (e.g. the liver dome),
       the middle of the segmented stretch below all classes when it is at least 5 slices long
       (e.g. the pelvis: what the model left empty is shown too), the lowest and highest slice
       holding any class, the slice of largest area of each class; a class or "any class" counts
       on a slice from ``min_voxels`` voxels on;
    2. then the middle of the largest remaining gap, until ``max_tiles`` slices are shown or the
       gaps are small.

    Picks closer than a minimum gap (1/(4·max_tiles) of the segmented range) to an earlier pick are
    dropped. Without any class: evenly spaced segmented slices. Raises ValueError for no slices.
    """
    seg = sorted({int(z) for z in segmented})
    if not seg:
        raise ValueError("no segmented slices to show")
    n_lab = int(labels.max()) + 1
    area = {z: np.bincount(labels[z].ravel(), minlength=n_lab) for z in seg}
    present = [z for z in seg if area[z][1:].sum() >= min_voxels]
    if not present:
        idx = np.linspace(0, len(seg) - 1, min(max_tiles, len(seg))).round().astype(int)
        return sorted({seg[i] for i in idx})
    lo, hi = present[0], present[-1]
    classes = [k for k in range(1, n_lab) if any(area[z][k] >= min_voxels for z in seg)]
    below, above = [z for z in seg if z < lo], [z for z in seg if z > hi]
    ranked = [max(z for z in seg if area[z][k] >= min_voxels) for k in classes]  # top of each class
    ranked += [s[len(s) // 2] for s in (below, above) if len(s) >= 5]
    ranked += [lo, hi]
    ranked += [max(seg, key=lambda z, k=k: (area[z][k], -z)) for k in classes]  # largest area
    gap = max(1, (seg[-1] - seg[0] + 1) // (4 * max_tiles))
    kept: list[int] = []
    for z in ranked:
        if len(kept) < max_tiles and all(abs(z - k) >= gap for k in kept):
            kept.append(z)
    while len(kept) < max_tiles:
        ends = sorted(kept)
        a, b = max(zip(ends, ends[1:]), key=lambda ab: ab[1] - ab[0], default=(ends[0], ends[0]))
        if b - a < 2 * gap:
            break
        mid = (a + b) // 2
        kept.append(min(seg, key=lambda z: abs(z - mid)))  # a segmented slice near the middle
        if kept[-1] in kept[:-1]:
            kept.pop()
            break
    return sorted(kept)


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)  # scalable (Pillow >= 10.1 with FreeType)
    except TypeError:  # older Pillow: the fixed bitmap font
        return ImageFont.load_default()


def _text(draw, xy, text, font, fill=(255, 255, 255), anchor="la"):
    """Text with a 2-px dark outline, readable on CT grey and on class colours."""
    draw.text(xy, text, font=font, fill=fill, anchor=anchor, stroke_width=2, stroke_fill=(0, 0, 0))


def overlay_png(path: Path, vol, labels: np.ndarray, zs: list[int], class_names=None, volumes=None,
                window: str = "abdomen", title: str = "", tile_px: int = 300) -> Path:
    """Write a PNG of axial slices ``zs`` of ``vol`` (a Volume, HU) with ``labels`` ((z, y, x),
    same shape) blended in the package's fixed class colours.

    Each tile shows the CT in the ``window`` preset, a header "slice <z> · z <mm>" (z = display
    index as on napari's slider; mm = LPS/RAS S coordinate of the slice centre from the header)
    and the letters of its edges (:func:`view_letters`). In-plane pixels are drawn at their true
    aspect (spacing), ``tile_px`` on the long side. Below the tiles: a legend with colour, name
    and, when ``volumes`` (:func:`class_volumes`) is given, volume in mL and component count.
    Written atomically. Raises ValueError when ``labels`` and ``vol`` differ in shape.
    """
    from PIL import Image, ImageDraw

    from .io.atomic import atomic_path
    from .ui.layers import class_colormap  # pure data; no napari import

    if labels.shape != vol.shape:
        raise ValueError(f"labels {labels.shape} do not match the volume {vol.shape}")
    n_classes = max(len(class_names or []), int(labels.max()) + 1)
    names = list(class_names) if class_names else [f"class {k}" for k in range(n_classes)]
    colors = class_colormap(n_classes)
    lo, hi = window_limits(window)
    sz, sy, sx = vol.spacing
    h, w = vol.shape[1:]
    zoom = tile_px / max(w * sx, h * sy)  # px per mm
    tw, th = max(1, int(round(w * sx * zoom))), max(1, int(round(h * sy * zoom)))
    resample = Image.NEAREST if tw >= w else Image.BOX  # crisp voxels up, no aliasing down
    letters = view_letters(vol)
    font, small = _font(15), _font(13)
    head, pad = 22, 6
    cols = min(len(zs), 4)
    rows = -(-len(zs) // cols)
    legend_rows = [k for k in range(1, n_classes)]
    legend_h = 26 + 20 * len(legend_rows) + 20
    title_h = 24 if title else 0
    W = cols * tw + (cols + 1) * pad
    H = title_h + rows * (th + head + pad) + pad + legend_h
    canvas = Image.new("RGB", (W, H), (20, 20, 20))
    draw = ImageDraw.Draw(canvas)
    if title:
        _text(draw, (pad, 4), title, font)
    for i, z in enumerate(zs):
        g = np.clip((vol.data[z].astype(np.float32) - lo) / (hi - lo), 0, 1)
        rgb = np.repeat(g[..., None], 3, -1)
        for k in range(1, n_classes):
            m = labels[z] == k
            if m.any():
                rgb[m] = 0.55 * rgb[m] + 0.45 * np.asarray(colors[k][:3])
        tile = Image.fromarray((rgb * 255).round().astype(np.uint8)).resize((tw, th), resample)
        x0 = pad + (i % cols) * (tw + pad)
        y0 = title_h + pad + (i // cols) * (th + head + pad)
        zmm = vol.origin[0] + z * sz
        _text(draw, (x0, y0 + 2), f"slice {z}  ·  z {zmm:.1f} mm", small)
        canvas.paste(tile, (x0, y0 + head))
        cy, cx = y0 + head + th // 2, x0 + tw // 2
        _text(draw, (x0 + 4, cy), letters["left"], font, (255, 230, 0), "lm")
        _text(draw, (x0 + tw - 4, cy), letters["right"], font, (255, 230, 0), "rm")
        _text(draw, (cx, y0 + head + 3), letters["top"], font, (255, 230, 0), "mt")
        _text(draw, (cx, y0 + head + th - 3), letters["bottom"], font, (255, 230, 0), "mb")
    ly = title_h + rows * (th + head + pad) + pad
    by_index = {v.index: v for v in volumes or []}
    _text(draw, (pad, ly), "legend (radiological view: the patient's right on the image left)", small)
    for j, k in enumerate(legend_rows):
        y = ly + 24 + 20 * j
        c = tuple(int(round(255 * v)) for v in colors[k][:3])
        draw.rectangle([pad, y, pad + 14, y + 14], fill=c, outline=(255, 255, 255))
        v = by_index.get(k)
        extra = (f"  {v.ml:.1f} mL, {v.components} component{'s' if v.components != 1 else ''}"
                 if v is not None else "")
        _text(draw, (pad + 22, y), f"{names[k] if k < len(names) else f'class {k}'}{extra}", small)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        canvas.save(tmp, format="PNG", optimize=True)
    return path


# ----------------------------------------------------------------------------- the job
def _headless(args, vol, phantom, name: str, stem: str) -> int:
    from .cli import _check_outputs, _checked, _record, _resolve, _slices, segment_volume
    from .io import write_mask
    from .io.sidecar import sidecar_path
    from .metrics import evaluate_labels
    from .threads import configure_threads

    out = Path(args.out)
    _slices(args.slices, vol)  # a bad --slices fails before the model loads
    ckpt = _resolve(args.model, None)
    mask_path = out / f"{stem}_{ckpt.family}_mask.nii.gz"
    png_path = out / f"{stem}_{ckpt.family}_overlay.png"
    _check_outputs([mask_path, png_path], [Path(vol.source_path)] if vol.source_path else [])
    args.threads = configure_threads(args.threads)
    vol, report = _checked(vol, ckpt, args)
    res = segment_volume(vol, ckpt, args, name)
    labels = res.labels
    mask = write_mask(mask_path, labels, like=vol, record=_record(vol, ckpt, args, res, report))
    vols = class_volumes(labels, vol.spacing, ckpt.class_names)
    zs = overlay_slices(labels, res.z)
    title = f"{name}  ·  {ckpt.family}  ·  slices {min(res.z)}..{max(res.z)}"
    png = overlay_png(png_path, vol, labels, zs, ckpt.class_names, vols, title=title)
    print(f"input: {name} {vol.shape[0]} slices {'x'.join(f'{s:g}' for s in vol.spacing)} mm"
          + (f" ({vol.source_path})" if vol.source_path else ""))
    if args.input is None:
        from .data import SAMPLE_CT_DESCRIPTION

        print(f"  {SAMPLE_CT_DESCRIPTION}")
    print(f"model: {ckpt.family} ({', '.join(ckpt.class_names)}); {len(res.z)} slices at "
          f"{res.slices_per_second:.1f} slices/s")
    print(_volume_table(vols, res.z))
    print(f"mask: {mask} (+ {sidecar_path(mask).name})")
    print(f"overlay: {png} (slices {', '.join(map(str, zs))})")
    if phantom is not None:
        ref = np.zeros_like(phantom.labels)
        for i, cname in enumerate(ckpt.class_names):
            if cname in phantom.class_names and i > 0:
                ref[phantom.labels == phantom.class_names.index(cname)] = i
        scores = evaluate_labels(labels[res.z], ref[res.z], vol.spacing,
                                 {i: c for i, c in enumerate(ckpt.class_names) if i > 0})
        for cname, m in scores.items():
            print(f"phantom {cname}: Dice {m['dice']:.3f}  HD95 {m['hd95_mm']:.1f} mm")
    return 0


def run_demo(args) -> int:
    """``genseg demo``: ``--headless`` segments and writes mask + sidecar + overlay PNG and prints
    the volumes; otherwise napari opens with the CT, the Segment dock and the model running."""
    vol, phantom, name, stem = demo_volume(args.input)
    if args.headless:
        return _headless(args, vol, phantom, name, stem)
    if args.slices:
        from .cli import _slices

        _slices(args.slices, vol)  # a bad --slices is one line before any window opens
    import napari

    from .ui._demo import show_in_viewer

    viewer = napari.Viewer(title="napari-genseg demo")
    show_in_viewer(viewer, vol, name, args)
    napari.run()
    return 0
