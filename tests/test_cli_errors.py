"""User input vs bugs in the CLI: InputError -> one line + exit 2, checked before torch is imported
or a model is loaded; any other exception keeps its traceback."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from napari_genseg.cli import main

SRC = Path(__file__).resolve().parents[1] / "src"

_PROBE = """
import json, sys
from napari_genseg.cli import main
rc = main(sys.argv[1:])
print(json.dumps({"rc": rc, "torch": "torch" in sys.modules,
                  "models": sorted(m for m in sys.modules if m.startswith("napari_genseg.models"))}))
"""


def _fresh_cli(args: list[str]) -> tuple[dict, str]:
    """Run ``genseg ARGS`` in a fresh interpreter; -> (probe result, stderr)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    p = subprocess.run([sys.executable, "-c", _PROBE, *args], capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout.strip().splitlines()[-1]), p.stderr


@pytest.mark.parametrize("case", ["missing input", "output is the input", "output folder is a file",
                                  "missing case in a cohort list", "output folder cannot be written",
                                  "output's sidecar is the input's", "output's sidecar is another file"])
def test_input_mistakes_fail_before_torch_and_model(case, ct_case, tmp_path):
    """Today's faults: a missing input failed after the model loaded, an output equal to the
    input after the whole run, an output under a file with a traceback after the whole run."""
    ct = tmp_path / "ct.nii.gz"
    shutil.copy(ct_case.path, ct)
    (tmp_path / "afile").write_text("not a folder")
    args, msg = {
        "missing input": ([str(tmp_path / "nope.nii.gz"), "--out", str(tmp_path / "m.nii.gz")], "no such file"),
        "output is the input": ([str(ct), "--out", str(ct)], "refusing to overwrite the source image"),
        "output folder is a file": ([str(ct), "--out", str(tmp_path / "afile" / "m.nii.gz")], "is a file, not a folder"),
        "missing case in a cohort list": ([str(tmp_path / "list.txt"), "--out", str(tmp_path / "masks")], "not an existing file or folder"),
        # os.access passes for root in /proc; only creating a file tells
        "output folder cannot be written": ([str(ct), "--out", "/proc/m.nii.gz"], "cannot write into /proc"),
        # ct.nii would write ct.json, the sidecar of ct.nii.gz
        "output's sidecar is the input's": ([str(ct), "--out", str(tmp_path / "ct.nii")], "sidecar of ct.nii.gz"),
        "output's sidecar is another file": ([str(ct), "--out", str(tmp_path / "notes.nii.gz")], "notes.json"),
    }[case]
    (tmp_path / "notes.json").write_text("{}\n")
    (tmp_path / "list.txt").write_text(f"{ct}\n{tmp_path / 'gone.nii.gz'}\n")
    before = ct.read_bytes()
    res, err = _fresh_cli(["segment", *args, "--device", "cpu", "--quiet"])
    lines = err.strip().splitlines()
    assert res["rc"] == 2 and len(lines) == 1 and lines[0].startswith("genseg: error:") and msg in lines[0], err
    assert not res["torch"] and not res["models"]
    assert ct.read_bytes() == before and not (tmp_path / "masks").exists()
    assert (tmp_path / "notes.json").read_text() == "{}\n"


def test_import_mistakes_fail_before_torch(tmp_path):
    res, err = _fresh_cli(["import", "msa2net", str(tmp_path / "none.pth"), "--out", str(tmp_path / "x.safetensors")])
    assert res["rc"] == 2 and "checkpoint not found" in err and not res["torch"]


def test_a_bug_inside_the_run_keeps_its_traceback(ct_case, double_checkpoint, tmp_path, monkeypatch):
    """A ValueError deep in model code is a bug, not exit 2 with a one-liner."""
    from _doubles import ThresholdNet

    def broken(self, x):
        raise ValueError("shape bug deep in the model")

    monkeypatch.setattr(ThresholdNet, "forward", broken)
    with pytest.raises(ValueError, match="shape bug"):
        main(["segment", str(ct_case.path), "--model", "testdouble", "--checkpoint", str(double_checkpoint),
              "--out", str(tmp_path / "m.nii.gz"), "--slices", "0:1", "--quiet"])
    assert not (tmp_path / "m.nii.gz").exists()


def test_a_bug_while_building_the_model_keeps_its_traceback(ct_case, double_checkpoint, tmp_path, monkeypatch):
    from _doubles import ThresholdNet

    def broken_init(self, cfg):
        raise KeyError("a registry bug")

    monkeypatch.setattr(ThresholdNet, "__init__", broken_init)
    with pytest.raises(KeyError, match="a registry bug"):
        main(["segment", str(ct_case.path), "--model", "testdouble", "--checkpoint", str(double_checkpoint),
              "--out", str(tmp_path / "m.nii.gz"), "--quiet"])


def test_cohort_goes_on_after_a_bad_case_but_not_after_a_bug(ct_case, double_checkpoint, tmp_path, monkeypatch, capsys):
    cases = tmp_path / "cases"
    cases.mkdir()
    shutil.copy(ct_case.path, cases / "a.nii.gz")
    (cases / "b.nii.gz").write_bytes(b"not a nifti file")
    shutil.copy(ct_case.path, cases / "c.nii.gz")
    args = ["segment", str(cases), "--model", "testdouble", "--checkpoint", str(double_checkpoint),
            "--out", str(tmp_path / "masks"), "--slices", "0:1", "--quiet"]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "b.nii.gz" in err and "1 of 3 cases failed" in err
    assert sorted(p.name for p in (tmp_path / "masks").glob("*.nii.gz")) == ["a_mask.nii.gz", "c_mask.nii.gz"]
    import json

    run = json.loads((tmp_path / "masks" / "genseg_run.json").read_text())
    assert [c["status"] for c in run["cases"]] == ["written", "failed", "written"]
    from _doubles import ThresholdNet

    def broken(self, x):
        raise IndexError("bug")

    monkeypatch.setattr(ThresholdNet, "forward", broken)
    with pytest.raises(IndexError):
        main(args + ["--overwrite"])


def test_train_bug_keeps_traceback_and_bad_data_exits_2_before_training(tmp_path, monkeypatch, capsys):
    from napari_genseg.training import loop

    calls = []

    def broken_train(cfg, on_step=None):
        calls.append(cfg)
        raise KeyError("bug in the loop")

    monkeypatch.setattr(loop, "train", broken_train)
    base = ["train", "--model", "msa2net_tiny", "--steps", "1", "--out", str(tmp_path / "t"), "--quiet"]
    with pytest.raises(KeyError, match="bug in the loop"):
        main(base + ["--data", "phantom:1"])
    assert len(calls) == 1
    rc = main(base + ["--data", f"pairs:{tmp_path / 'ct.nii.gz'},{tmp_path / 'lab.nii.gz'}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "no such file" in err[0] and len(calls) == 1
    assert main(base + ["--data", "phantom:x"]) == 2 and "phantom:N" in capsys.readouterr().err


def test_evaluate_checks_data_before_loading_the_checkpoint(tmp_path, monkeypatch, capsys):
    from napari_genseg.models import checkpoints

    monkeypatch.setattr(checkpoints, "load_checkpoint", lambda *a, **k: pytest.fail("checkpoint loaded first"))
    rc = main(["evaluate", str(tmp_path / "c.safetensors"), f"msd:{tmp_path / 'nothing'}"])
    assert rc == 2 and "no such file or folder" in capsys.readouterr().err


def test_python_warnings_print_as_one_line(monkeypatch):
    """While a command runs, a Python warning (e.g. the cuda -> cpu fallback) is formatted as the CLI's
    own ``warning: ...`` line, without the source file and code line; the format is restored afterwards."""
    import warnings

    from napari_genseg import cli

    seen = []

    def command(args):
        seen.append(warnings.formatwarning("CUDA is not available: running on the CPU\nsecond line",
                                           UserWarning, "/x/device.py", 12, "warnings.warn(...)"))
        return 0

    monkeypatch.setattr(cli, "cmd_models", command)
    before = warnings.formatwarning
    assert cli.main(["models"]) == 0
    assert seen == ["warning: CUDA is not available: running on the CPU\n"]
    assert warnings.formatwarning is before


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_a_cohort_with_unreadable_weights_fails_once_before_any_case(ct_case, double_checkpoint, tmp_path, capsys,
                                                                     backend):
    """The checkpoint loads lazily for every backend but torch; weights that cannot be read must
    still stop the run up front with one line (exit 2, no output folder), not fail case by case."""
    cases = tmp_path / "cases"
    cases.mkdir()
    for name in ("a", "b"):
        shutil.copy(ct_case.path, cases / f"{name}.nii.gz")
    broken = tmp_path / "broken" / "double.safetensors"
    broken.parent.mkdir()
    shutil.copy(double_checkpoint.with_suffix(".json"), broken.with_suffix(".json"))
    broken.write_bytes(double_checkpoint.read_bytes()[:64])
    rc = main(["segment", str(cases), "--model", "testdouble", "--checkpoint", str(broken), "--backend", backend,
               "--out", str(tmp_path / "masks"), "--slices", "0:1", "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "cannot read weights double.safetensors" in err[0]
    assert not (tmp_path / "masks").exists()


def test_a_config_that_cannot_build_its_model_is_one_line(ct_case, tmp_path, capsys):
    """Settings each valid alone but not together (MSA²Net channel attention heads that do not
    divide a stage width) fail as the checkpoint's error, not with a traceback."""
    from napari_genseg.models import registry
    from napari_genseg.models.checkpoints import save_checkpoint

    entry = registry.get_entry("msa2net_tiny")
    ck = save_checkpoint(tmp_path / "t.safetensors", registry.create_model("msa2net_tiny"), "msa2net", "msa2net_tiny",
                         entry.config, ["background", "liver"],
                         {"normalization": {"kind": "hu_window", "low": -125.0, "high": 275.0}, "grid": "resize"})
    meta = json.loads(ck.with_suffix(".json").read_text())
    meta["config"]["channel_attn_heads"] = 3
    ck.with_suffix(".json").write_text(json.dumps(meta))
    rc = main(["segment", str(ct_case.path), "--model", "msa2net", "--checkpoint", str(ck), "--backend", "torch",
               "--out", str(tmp_path / "m.nii.gz"), "--slices", "0:1", "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "t.json: its config does not build a msa2net model" in err[0]


@pytest.mark.parametrize("names", [["background", "liver"], ["background", "liver", "spleen", "kidney"]])
def test_class_names_must_match_the_models_classes(ct_case, tmp_path, capsys, names):
    """A 3-class model whose JSON names 2 classes gave a mask with an unnamed label 2; with 4
    names a class that can never occur was listed. Both are the checkpoint's one-line error now."""
    from napari_genseg.models import registry
    from napari_genseg.models.checkpoints import CheckpointError, load_checkpoint, save_checkpoint

    entry = registry.get_entry("msa2net_tiny")
    cfg = dataclasses.replace(entry.config, num_classes=3)
    ck = save_checkpoint(tmp_path / "t.safetensors", registry.get_family("msa2net").build(cfg), "msa2net",
                         "msa2net_tiny", cfg, ["background", "liver", "spleen"],
                         {"normalization": {"kind": "hu_window", "low": -125.0, "high": 275.0}, "grid": "resize"})
    load_checkpoint(ck)  # as written: fine
    meta = json.loads(ck.with_suffix(".json").read_text())
    meta["class_names"] = names
    ck.with_suffix(".json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=f"t.json: {len(names)} class names for a model with 3 classes"):
        load_checkpoint(ck, lazy=True)
    rc = main(["segment", str(ct_case.path), "--model", "msa2net", "--checkpoint", str(ck),
               "--out", str(tmp_path / "m.nii.gz"), "--slices", "0:1", "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "class names" in err[0]


def test_one_line_is_the_shared_one_line_form_of_an_error():
    """``errors.one_line``, used by the CLI and every dock: the first non-blank line, a file and
    its reason for an OSError, the class name for an empty message."""
    from napari_genseg.errors import InputError, one_line

    assert one_line(InputError("\n  bad spacing 0 mm \nsee --help")) == "bad spacing 0 mm"
    assert one_line(FileNotFoundError(2, "No such file or directory", "/x/ct.nii.gz")) == \
        "/x/ct.nii.gz: No such file or directory"
    assert one_line(PermissionError(13, "Permission denied")) == "Permission denied"
    assert one_line(RuntimeError("")) == "RuntimeError"
