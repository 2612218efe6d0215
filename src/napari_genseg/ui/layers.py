"""Volume <-> napari layer data (geometry in metadata, class names and fixed colours)."""

from __future__ import annotations

import numpy as np

from ..preprocessing import window_limits
from ..volume import Volume

__all__ = [
    "GEOMETRY_KEY",
    "image_layer_data",
    "volume_from_layer",
    "geometry_metadata",
    "class_colormap",
    "class_features",
]

GEOMETRY_KEY = "genseg_geometry"

#: fixed colours for class ids (RGBA 0..1); id 0 transparent
_PALETTE = [
    (0.0, 0.0, 0.0, 0.0),
    (0.90, 0.35, 0.20, 1.0),  # 1 orange-red (liver in the demo)
    (0.25, 0.55, 0.95, 1.0),  # 2 blue (spleen)
    (0.30, 0.80, 0.35, 1.0),  # 3 green
    (0.95, 0.80, 0.20, 1.0),  # 4 yellow
    (0.75, 0.40, 0.85, 1.0),  # 5 purple
    (0.20, 0.85, 0.85, 1.0),  # 6 cyan
    (0.95, 0.55, 0.75, 1.0),  # 7 pink
    (0.60, 0.60, 0.60, 1.0),  # 8 grey
]


def geometry_metadata(vol: Volume) -> dict:
    return {
        GEOMETRY_KEY: {
            "spacing": vol.spacing,
            "origin": vol.origin,
            "source_affine": vol.source_affine,
            "ornt": vol.ornt,
            "source_shape": vol.source_shape,
            "source_header": vol.source_header,
            "source_path": vol.source_path,
            "resampled": vol.resampled,
            "orientation": vol.orientation,
            "meta": {k: v for k, v in vol.meta.items() if k != "files_in_order"},
        }
    }


def image_layer_data(vol: Volume, name: str, window: str = "abdomen") -> tuple:
    kwargs = {
        "name": name,
        "colormap": "gray",
        "contrast_limits": window_limits(window),
        "metadata": geometry_metadata(vol),
        **vol.layer_kwargs(),
    }
    return (vol.data, kwargs, "image")


def volume_from_layer(data: np.ndarray, metadata: dict | None, scale=None, translate=None) -> Volume | None:
    """Rebuild a Volume (with its source geometry when the layer carries it)."""
    geo = (metadata or {}).get(GEOMETRY_KEY)
    data = np.asarray(data)
    if data.ndim != 3:
        raise ValueError(f"layer data must be 3-D (z, y, x); got shape {data.shape}")
    if geo is None:
        spacing = tuple(scale[-3:]) if scale is not None else (1.0, 1.0, 1.0)
        origin = tuple(translate[-3:]) if translate is not None else (0.0, 0.0, 0.0)
        return Volume(data, spacing=spacing, origin=origin)
    return Volume(
        data,
        spacing=geo["spacing"],
        origin=geo["origin"],
        source_affine=geo["source_affine"],
        ornt=geo["ornt"],
        source_shape=geo["source_shape"],
        source_header=geo["source_header"],
        source_path=geo["source_path"],
        meta=dict(geo.get("meta") or {}),
        resampled=bool(geo.get("resampled", False)),
    )


def class_colormap(n_classes: int) -> dict:
    """label id -> RGBA for napari's DirectLabelColormap (``None`` key = any other id)."""
    colors = {i: _PALETTE[i % len(_PALETTE)] if i < len(_PALETTE) else _PALETTE[1 + i % 8]
              for i in range(max(n_classes, 1))}
    colors[None] = (1.0, 1.0, 1.0, 1.0)
    return colors


def class_features(class_names: list[str]) -> dict:
    return {"index": list(range(len(class_names))), "class": list(class_names)}
