"""Export the AR-Seg scale progression of one slice: frames, animated GIF, MP4 or PNG strip.

No napari or Qt; used by the AR-Seg explorer's Export button.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..preprocessing import window_limits

__all__ = ["render_progression_frames", "save_progression"]


def render_progression_frames(image2d: np.ndarray, scale_means: np.ndarray, threshold: float = 0.5,
                              window: str = "abdomen", colour=(0.95, 0.35, 0.2), upscale: int = 3) -> list[np.ndarray]:
    """One RGB uint8 frame per scale: the windowed CT slice, the scale-k consensus blended in,
    and 'scale k/K' written in the corner.

    image2d (H, W) HU; scale_means (K, H, W) mean of the N sample masks after each scale, in [0, 1];
    returns K frames of (upscale·H, upscale·W, 3) uint8.
    """
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
    """Write ``frames`` as .gif (animated, looping), .mp4 (imageio-ffmpeg) or .png (a horizontal
    strip), atomically. Raises ``ValueError`` for another extension, ``RuntimeError`` for .mp4
    without imageio-ffmpeg, ``OSError`` when the file cannot be written."""
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
