"""The dock widgets' one error path (ui/_run.py::notify_error): input -> one line; bug -> traceback."""

from __future__ import annotations

import pytest


@pytest.fixture
def notes(monkeypatch):
    from napari.utils.notifications import notification_manager

    got = []
    monkeypatch.setattr(notification_manager, "dispatch", got.append)
    return got


def _raised(exc):
    try:
        raise exc
    except BaseException as e:  # noqa: BLE001 - a real traceback to show
        return e


def test_input_error_is_one_line_without_traceback(notes):
    from napari.utils.notifications import ErrorNotification, NotificationSeverity

    from napari_genseg.models.checkpoints import CheckpointError
    from napari_genseg.ui._run import notify_error

    notify_error(_raised(CheckpointError("ckpt.safetensors: checkpoint not found")), "Segmentation failed")
    notify_error("Choose an image layer first.")
    assert [n.message for n in notes] == ["Segmentation failed: ckpt.safetensors: checkpoint not found",
                                          "Choose an image layer first."]
    assert all(n.severity == NotificationSeverity.ERROR and not isinstance(n, ErrorNotification) for n in notes)


def test_any_other_exception_keeps_its_traceback(notes):
    from napari.utils.notifications import ErrorNotification

    from napari_genseg.ui._run import notify_error

    notify_error(_raised(KeyError("decoder_2")), "AR-Seg failed")
    [n] = notes
    assert isinstance(n, ErrorNotification) and isinstance(n.exception, KeyError)
    assert n.message.startswith("AR-Seg failed: KeyError") and "_raised" in n.as_text()


def test_every_generator_worker_of_the_docks_reports_runtime_errors():
    """The whole kind of the hung-dock fault: superqt's GeneratorWorker swallows a RuntimeError
    from its generator (no errored, no finished), so every ``@thread_worker`` generator in ui/
    must also carry ``@reports_runtime_errors``. Found by reading the sources."""
    import ast
    from pathlib import Path

    import napari_genseg.ui as ui

    missing, found = [], 0
    for path in Path(ui.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.FunctionDef):
                continue
            names = {ast.unparse(d).split("(")[0] for d in node.decorator_list}
            gen = any(isinstance(n, (ast.Yield, ast.YieldFrom)) for n in ast.walk(node))
            if "thread_worker" in names and gen:
                found += 1
                if "reports_runtime_errors" not in names:
                    missing.append(f"{path.name}:{node.lineno} {node.name}")
    assert found >= 4 and not missing, missing
