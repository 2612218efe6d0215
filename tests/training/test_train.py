import json
from pathlib import Path

import pytest
import torch

from napari_genseg.models.checkpoints import load_checkpoint
from napari_genseg.training.loop import train, train_state_path


def test_short_train_lowers_loss_and_writes_checkpoint(tiny_cfg):
    losses = []
    summary = train(tiny_cfg(steps=30, val_every=15), on_step=lambda s, l: losses.append(l))
    assert summary["step"] == 30 and len(losses) == 30
    assert sum(losses[-8:]) / 8 < sum(losses[:8]) / 8 * 0.85
    ck = load_checkpoint(summary["checkpoint"])
    assert ck.class_names == ["background", "liver", "spleen"]
    assert ck.input["normalization"] == {"kind": "hu_window", "low": -125.0, "high": 275.0}
    assert ck.input["grid"] == "spacing" and ck.input["spacing_mm"] == [12.0, 12.0]
    prov = ck.provenance
    for key in ("data", "split", "recipe", "hyperparameters", "git_commit", "torch", "wall_seconds",
                "validation", "data_cases"):
        assert key in prov
    assert prov["recipe"] == "adamw" and prov["loss"] == "dice_ce"
    assert prov["torch"] == torch.__version__
    assert prov["validation"]["mean_dice"].keys() == {"liver", "spleen"}
    assert [c["seed"] for c in prov["data_cases"]] == [0, 1, 2]
    val_cases = {v["case"] for v in prov["split"]["val"]}
    train_cases = {v["case"] for v in prov["split"]["train"]}
    assert len(val_cases) == 1 and not val_cases & train_cases
    st = torch.load(train_state_path(summary["checkpoint"]), weights_only=True)
    assert st["step"] == 30


def test_resume_continues_step_count(tiny_cfg, tmp_path):
    first = train(tiny_cfg(steps=6, recipe="paper", lr=None))
    out2 = tmp_path / "resumed.safetensors"
    seen = []
    second = train(tiny_cfg(steps=10, recipe="paper", lr=None, resume=first["checkpoint"], out=str(out2)),
                   on_step=lambda s, l: seen.append(s))
    assert seen == [7, 8, 9, 10] and second["step"] == 10
    st = torch.load(train_state_path(out2), weights_only=True)
    assert st["step"] == 10
    prov = load_checkpoint(out2).provenance
    assert prov["recipe"] == "paper" and prov["loss"] == "bdou"
    assert prov["hyperparameters"]["lr"] == pytest.approx(0.05 * 4 / 24)


def test_cli_train_with_config_file(tiny_cfg, tmp_path):
    from napari_genseg.cli import main

    cfg = tiny_cfg(steps=3)
    cfg.pop("quiet")
    cfg_file = tmp_path / "train.json"
    cfg_file.write_text(json.dumps(cfg))
    out = tmp_path / "cli.safetensors"
    rc = main(["train", "--config", str(cfg_file), "--steps", "4", "--out", str(out), "--quiet",
               "--classes", "background,liver,spleen", "--holdout-slices", "none"])
    assert rc == 0
    ck = load_checkpoint(out)
    assert ck.provenance["hyperparameters"]["steps"] == 4


def test_cli_bad_option_exits_2(tmp_path, capsys):
    from napari_genseg.cli import main

    rc = main(["train", "--model", "msa2net_tiny", "--data", "nonsense:1", "--out", str(tmp_path / "x")])
    assert rc == 2
    assert "unknown data spec" in capsys.readouterr().err


def test_msa2net_tiny_trains(tiny_cfg):
    losses = []
    s = train(tiny_cfg(model="msa2net_tiny", img_size=None, steps=3, batch_size=2, lr=2e-3, val_fraction=0.0,
                       holdout_slices="none", data=["phantom:1"], threads=1),
              on_step=lambda st, l: losses.append(l))
    assert s["step"] == 3 and all(l == l and l < 10 for l in losses)  # finite; the loss drop is tested on tinyseg
    ck = load_checkpoint(s["checkpoint"])
    assert ck.family == "msa2net" and ck.config.num_classes == 3


def test_time_budget_schedule_ends_at_zero_lr(tiny_cfg):
    s = train(tiny_cfg(steps=None, time_budget_minutes=0.04, val_fraction=0.0, data=["phantom:1"]))
    assert s["step"] > 3 and not s["stopped_early"]
    ck = load_checkpoint(s["checkpoint"])
    hp = ck.provenance["hyperparameters"]
    assert hp["time_budget_minutes"] == 0.04 and hp["steps"] is None
    st = torch.load(train_state_path(s["checkpoint"]), weights_only=True)
    assert st["optimizer"]["param_groups"][0]["lr"] < 1e-4


@pytest.mark.parametrize("native", [True, False])
def test_training_bf16_on_cpu_follows_native_support(tiny_cfg, monkeypatch, native):
    """Training takes the inference rule (``device.cpu_bf16_support``): bf16 asked on a CPU
    trains in bf16 where native, in fp32 with one warning where emulated."""
    import warnings

    from napari_genseg import device

    monkeypatch.setattr(device, "_WARNED", set())
    monkeypatch.setattr(device, "cpu_bf16_support", lambda: (native, "x86 CPU without AVX512_BF16 or AMX-BF16"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        s = train(tiny_cfg(steps=1, precision="bf16", val_fraction=0.0, holdout_slices="none"))
    msgs = [str(w.message) for w in caught if "bf16" in str(w.message)]
    assert load_checkpoint(s["checkpoint"]).provenance["hyperparameters"]["precision"] == ("bf16" if native else "fp32")
    assert len(msgs) == (0 if native else 1)


def test_precision_follows_the_device_rule(tiny_cfg, monkeypatch):
    """CPU: auto = fp32; fp16 asked on a CPU runs fp32 with one warning (``device.resolve_precision``)."""
    import warnings

    from napari_genseg import device

    monkeypatch.setattr(device, "_WARNED", set())
    s = train(tiny_cfg(steps=1, val_fraction=0.0, holdout_slices="none"))
    assert load_checkpoint(s["checkpoint"]).provenance["hyperparameters"]["precision"] == "fp32"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        s = train(tiny_cfg(steps=2, precision="fp16", val_fraction=0.0, holdout_slices="none"))
    msgs = [str(w.message) for w in caught if "fp16" in str(w.message)]
    assert len(msgs) == 1 and "fp32" in msgs[0]  # once per run, not once per step
    assert load_checkpoint(s["checkpoint"]).provenance["hyperparameters"]["precision"] == "fp32"


def test_init_fine_tunes_from_a_checkpoint_and_records_it(tiny_cfg, tmp_path):
    """``init`` starts the segmentation task from a checkpoint's weights: with lr 0 (AdamW, no
    weight decay) the result equals the init weights exactly; without init it would be a fresh
    random model. The provenance names the init checkpoint."""
    first = train(tiny_cfg(steps=3))
    meta_path = Path(first["checkpoint"]).with_suffix(".json")
    meta = json.loads(meta_path.read_text())
    meta["postprocess"]["liver"]["fill_holes"] = False  # a hand-edited clean-up declaration
    meta_path.write_text(json.dumps(meta))
    out2 = tmp_path / "ft.safetensors"
    second = train(tiny_cfg(steps=2, lr=0.0, weight_decay=0.0, warmup_steps=0, init=first["checkpoint"], out=str(out2),
                            seed=5))
    a, b = load_checkpoint(first["checkpoint"]).model.state_dict(), load_checkpoint(out2).model.state_dict()
    for k in a:
        if a[k].is_floating_point() and "running" not in k and "num_batches" not in k:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    assert load_checkpoint(out2).provenance["init"]["path"] == first["checkpoint"]
    assert load_checkpoint(out2).postprocess["liver"]["fill_holes"] is False  # kept by fine-tuning
    assert second["step"] == 2


def test_init_with_another_class_count_is_an_input_error(tiny_cfg, tmp_path):
    from napari_genseg.models.checkpoints import CheckpointError

    first = train(tiny_cfg(steps=1))
    with pytest.raises(CheckpointError, match="do not fit"):
        train(tiny_cfg(steps=1, classes=["background", "liver"], label_map="1:1", init=first["checkpoint"],
                       out=str(tmp_path / "x.safetensors")))
