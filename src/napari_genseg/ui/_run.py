"""What both dock widgets share: loading a model, writing a run's batches into a Labels layer as
one undo step, and telling the user what went wrong (their input, or a bug)."""

from __future__ import annotations

import functools

import numpy as np

from ..errors import InputError, one_line

__all__ = ["LayerEdit", "notify_error", "notify_warnings", "add_class_labels", "load_model", "WorkerRuntimeError",
           "reports_runtime_errors"]


class WorkerRuntimeError(Exception):
    """A ``RuntimeError`` raised in a generator worker, carried out under another type (the
    original is its ``__cause__``; :func:`notify_error` shows that one). See
    :func:`reports_runtime_errors`."""


def reports_runtime_errors(gen_fn):
    """Decorate a generator function run by ``napari.qt.threading.thread_worker`` (below the
    ``@thread_worker`` line) so that a ``RuntimeError`` it raises reaches ``errored`` and
    ``finished``. superqt's ``GeneratorWorker`` (superqt 0.9, ``utils/_qthreading.py``) takes any
    ``RuntimeError`` from the generator for "the worker was deleted" and ends the thread with
    a warning only, emitting neither signal; torch raises ``RuntimeError`` for most failures
    (out of memory, shapes), so a dock waited for ever with its Run button disabled. The
    exception is re-raised as :class:`WorkerRuntimeError` from the original."""

    @functools.wraps(gen_fn)
    def wrapped(*args, **kwargs):
        try:
            return (yield from gen_fn(*args, **kwargs))
        except RuntimeError as exc:
            raise WorkerRuntimeError(f"{type(exc).__name__}: {exc}") from exc

    return wrapped


def load_model(name: str, checkpoint: str | None, lazy: bool = False):
    """``models.checkpoints.resolve_model`` for a dock: a family's shipped weights or ``checkpoint``.

    Loads on the CPU (the predictor moves the model to its device). ``lazy``: read and check the
    JSON now, build the model and load its weights where it is first read (in the dock's worker
    thread; never for an exported model whose export is cached). Applies the triton guard first
    (``_triton``): building MSA²Net imports timm, which would load triton after the canvas.
    Raises ``CheckpointError`` (an InputError) for a missing or unusable checkpoint, and
    ``UnknownModelError`` (an InputError) for an unknown model name.
    """
    from ..models.checkpoints import resolve_model
    from ._triton import block_triton_if_unsafe

    block_triton_if_unsafe()
    return resolve_model(name, checkpoint, lazy=lazy)


def notify_error(error: str | BaseException, context: str = "") -> None:
    """Tell the user about a failure in a napari notification.

    * a message (str) or an :class:`~napari_genseg.errors.InputError`: one line, no traceback
      (what the user gave cannot be used; the message says what to change);
    * any other exception is a bug: the notification names it and its details expander
      ("View Traceback") holds the traceback (napari's ``ErrorNotification``).

    ``context`` (e.g. "Segmentation failed") prefixes the line. Call on the main thread (worker
    ``errored`` signals arrive there).
    """
    from napari.utils.notifications import ErrorNotification, notification_manager, show_error

    prefix = f"{context}: " if context else ""
    if isinstance(error, WorkerRuntimeError) and error.__cause__ is not None:
        error = error.__cause__
    if isinstance(error, str):
        show_error(prefix + error)
    elif isinstance(error, InputError):
        show_error(prefix + one_line(error))
    else:
        note = ErrorNotification(error)
        note.message = f"{prefix}{type(error).__name__}: {error} (a bug: see the traceback)"
        notification_manager.dispatch(note)


def notify_warnings(caught) -> None:
    """Show warnings recorded with ``warnings.catch_warnings(record=True)`` as notifications
    (e.g. a checkpoint whose modules kept random weights)."""
    from napari.utils.notifications import show_warning

    for w in caught:
        show_warning(str(w.message))


def add_class_labels(viewer, image, name: str, class_names: list[str], **kwargs):
    """A uint8 Labels layer on ``image``'s grid with class names (status bar) and fixed colours;
    re-used when one of that name and shape exists."""
    from napari.utils.colormaps import DirectLabelColormap

    from .layers import class_colormap, class_features

    if name in viewer.layers:
        lay = viewer.layers[name]
        if lay.data.shape == image.data.shape:
            return lay
        name = name + " (new)"
    kw = {"opacity": 0.5, **kwargs}
    return viewer.add_labels(
        np.zeros(image.data.shape, dtype=np.uint8),
        name=name,
        scale=image.scale,
        translate=image.translate,
        metadata=dict(image.metadata),
        features=class_features(class_names),
        colormap=DirectLabelColormap(color_dict=class_colormap(len(class_names))),
        **kw,
    )


class LayerEdit:
    """Edits to a Labels layer grouped as one undo step (public ``block_history`` +
    ``data_setitem``): open with ``begin()``, write slices with ``set_slices``, close with ``end()``
    (also after a cancel or an error, so partial results stay and Ctrl+Z reverts them together)."""

    def __init__(self, layer):
        self.layer = layer
        self._ctx = None

    def begin(self) -> "LayerEdit":
        self._ctx = self.layer.block_history()
        self._ctx.__enter__()
        return self

    def set_slices(self, z, new: np.ndarray) -> None:
        z = np.asarray(z)
        old = np.asarray(self.layer.data[z])
        idx = np.nonzero(old != new)
        if idx[0].size:
            self.layer.data_setitem((z[idx[0]], idx[1], idx[2]), new[idx])

    def end(self) -> None:
        if self._ctx is not None:
            ctx, self._ctx = self._ctx, None
            ctx.__exit__(None, None, None)
