import csv
import json

from napari_genseg.training.evaluate import evaluate, format_table
from napari_genseg.training.loop import train
from _tinynet import PHANTOM_SHAPE, PHANTOM_SPACING


def test_evaluate_phantom_with_baseline(tiny_cfg, tmp_path):
    from napari_genseg.cli import main

    s = train(tiny_cfg(steps=3))
    res = evaluate(s["checkpoint"], ["phantom:1@100"], baseline="hu", phantom_shape=PHANTOM_SHAPE,
                   phantom_spacing=PHANTOM_SPACING)
    methods = {(r["method"], r["class"]) for r in res["rows"]}
    assert methods == {("model", "liver"), ("model", "spleen"), ("hu_baseline", "liver"), ("hu_baseline", "spleen")}
    assert "hu_baseline" in format_table(res)
    # CLI on a NIfTI pair (a phantom written to disk, other label ids mapped), a slice range, CSV + JSON
    import nibabel as nib
    import numpy as np

    from napari_genseg.phantom import make_phantom, phantom_affine

    ph = make_phantom(101, shape=tuple(PHANTOM_SHAPE), spacing=tuple(PHANTOM_SPACING))
    aff = phantom_affine(ph.image.shape, ph.spacing)
    lab = np.where(ph.labels == 1, 5, np.where(ph.labels == 2, 1, 0)).astype(np.uint8)  # TotalSeg-like ids
    img_p, lbl_p = tmp_path / "ct.nii.gz", tmp_path / "ct_labels.nii.gz"
    nib.save(nib.Nifti1Image(ph.image.transpose(2, 1, 0), aff), img_p)
    nib.save(nib.Nifti1Image(lab.transpose(2, 1, 0), aff), lbl_p)
    c, j = tmp_path / "e.csv", tmp_path / "e.json"
    rc = main(["evaluate", s["checkpoint"], f"pairs:{img_p},{lbl_p}", "--label-map", "5:1,1:2", "--baseline", "hu",
               "--slices", "4:10", "--csv", str(c), "--json", str(j)])
    assert rc == 0
    rows = list(csv.DictReader(open(c)))
    assert {r["method"] for r in rows} == {"model", "hu_baseline"}
    assert any(r["case"] == "MEAN" for r in rows)
    data = json.loads(j.read_text())
    assert data["slices"] == "4:10" and data["cases"] == ["ct"] and 0 <= data["mean"]["hu_baseline"]["liver"]["dice"] <= 1



def test_evaluate_both_baselines(tiny_cfg):
    s = train(tiny_cfg(steps=2))
    res = evaluate(s["checkpoint"], ["phantom:1@100"], baseline="both", phantom_shape=PHANTOM_SHAPE,
                   phantom_spacing=PHANTOM_SPACING)
    assert {r["method"] for r in res["rows"]} == {"model", "hu_baseline", "hu_auto_baseline"}
