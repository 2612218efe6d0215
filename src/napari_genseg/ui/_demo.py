"""The GUI form of ``genseg demo``: the CT, the Segment CT dock set up and started."""

from __future__ import annotations

__all__ = ["show_in_viewer"]


def show_in_viewer(viewer, vol, name: str, args):
    """The GUI form of the demo in ``viewer``: the CT as an image layer (with the sample's
    description in its metadata when it is the shipped sample), axis labels z/y/x, a corner note
    with the view's orientation letters, the Segment CT dock set to ``args.model`` / ``--device`` /
    ``--slices`` and started. Returns the dock widget (its ``worker`` is the run; None when the
    model could not be loaded: a warning says why and the dock stays open)."""
    from qtpy.QtWidgets import QApplication

    from ..demo import view_letters
    from ..models.checkpoints import CheckpointError, resolve_model
    from ._triton import block_triton_if_unsafe
    from .layers import image_layer_data

    data, kwargs, _ = image_layer_data(vol, name)
    if getattr(args, "input", None) is None:
        from ..data import SAMPLE_CT_DESCRIPTION

        kwargs["metadata"]["description"] = SAMPLE_CT_DESCRIPTION
    layer = viewer.add_image(data, **kwargs)
    viewer.dims.axis_labels = ("z", "y", "x")
    t = view_letters(vol)
    canvas = getattr(viewer, "canvas", None)  # napari >= 0.9; before: viewer.text_overlay
    note = canvas.overlays.text if canvas is not None else viewer.text_overlay
    note.text = (f"patient's {t['left']} on the left, {t['top']} at the top"
                 + (" (radiological)" if t["left"] == "R" else ""))
    note.position = "top_left"
    note.font_size = 9
    note.visible = True
    _, widget = viewer.window.add_plugin_dock_widget("napari-genseg", "Segment CT")
    widget._image.value = layer
    if getattr(args, "slices", None):
        from ..cli import _slices

        zs = _slices(args.slices, vol)
        widget._scope.value = "range"
        widget._start.value, widget._stop.value = min(zs), max(zs)
        viewer.dims.set_current_step(0, (min(zs) + max(zs)) // 2)
    else:
        viewer.dims.set_current_step(0, int(vol.shape[0] * 0.9))  # upper abdomen: liver and spleen
    QApplication.processEvents()  # lay the window out with the dock first,
    viewer.reset_view()  # then fit the whole slice to the canvas beside it
    try:
        block_triton_if_unsafe()  # as the dock does before it loads a model (ui/_triton.py)
        resolve_model(args.model)
    except CheckpointError as exc:
        from napari.utils.notifications import show_warning

        show_warning(f"{exc} The dock is open; choose a checkpoint to run.")
        return widget
    widget._model.value = args.model
    widget._device.value = args.device if args.device in widget._device.choices else "auto"
    widget._precision.value = getattr(args, "precision", "auto")
    widget._backend.value = getattr(args, "backend", "auto")
    widget.run()
    return widget
