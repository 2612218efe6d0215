"""AR-Seg training items in region-of-interest mode: crops of a fixed field of view (mm) around the
structures of a target class, as AR-Seg's paper trains on LIDC (128² crops centred on a nodule;
Chen et al., MICCAI 2025, Sec. 3.1; crops of the Probabilistic U-Net preprocessing, Kohl et al.
NeurIPS 2018).

An item is (case, slice z, class k, centre): one per 2-D connected component of the union of the
class's annotators on that slice (centre = the component's bounding-box centre, in index
coordinates), plus negative items centred on soft-tissue voxels (40..200 HU: liver, spleen,
muscle) whose crop holds none of the class, at rate ``empty_fraction`` of the positives. Every
item is cut at train time with ``roi.RoiCrop``, the same geometry the ROI predictor uses at
inference (``predictors.arseg_roi``): a square of ``fov_mm`` centred on the item's centre moved by
a uniform jitter of ±``jitter_mm`` per axis (redrawn every epoch; none for validation), resampled
to ``img_size``² bilinearly on the slice's own pixel spacing. The masks are cut the same way
(bilinear > 0.5), augmented jointly with the image (``data.Augment``), then area-resampled to the
mask grid. Multi-annotator classes draw one annotator per item (stage 2) or give one item per
annotator (stage 1), as the whole-slice items (``tasks.arseg.ArSegItems``).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage as ndi

from ...preprocessing import Normalization
from ...roi import RoiCrop
from .. import data as D

__all__ = ["ArSegRoiItems", "roi_item_centres"]

#: HU range of the voxels negative items are centred on (soft tissue)
NEGATIVE_HU = (40.0, 200.0)


def roi_item_centres(union2d: np.ndarray) -> list[tuple[float, float]]:
    """(H, W) bool -> the bounding-box centres (y, x) in index coordinates of its 8-connected
    components, in label order."""
    lab, n = ndi.label(union2d, structure=np.ones((3, 3), bool))
    out = []
    for sl in ndi.find_objects(lab):
        if sl is not None:
            out.append(((sl[0].start + sl[0].stop - 1) / 2.0, (sl[1].start + sl[1].stop - 1) / 2.0))
    return out


class ArSegRoiItems(torch.utils.data.Dataset):
    """ROI crops (see the module docstring). Items: (x (1, S, S) normalised, mask (1, M, M) float
    {0, 1}, AdaLN class id = label id - 1), S = ``img_size``, M = ``mask_size``."""

    def __init__(self, cases, split_items, class_names, img_size: int, mask_size: int, norm: Normalization,
                 fov_mm: float, jitter_mm: float = 0.0, augment: D.Augment | None = None,
                 empty_fraction: float = 0.1, class_repeat: dict | None = None, seed: int = 0,
                 all_annotators: bool = False):
        from .arseg import target_masks

        if not fov_mm or fov_mm <= 0:
            raise D.DataSpecError("ROI training needs a positive field of view (--roi-fov-mm)")
        self.cases, self.img_size, self.mask_size, self.norm = cases, int(img_size), int(mask_size), norm
        self.fov_mm, self.jitter_mm, self.augment, self.seed = float(fov_mm), float(jitter_mm), augment, seed
        self.epoch = 0
        self.n_pos = self.n_neg = 0
        rng = np.random.default_rng(seed)
        class_repeat = class_repeat or {}
        # items: (case, z, class, cy, cx, annotator or -1); masks[(case, class)] = (A, n, H, W) bool
        # on the split's slices only (``mask_slot[case][z]`` = the slice's index n there)
        self.items: list[tuple[int, int, int, float, float, int]] = []
        self.masks: dict[tuple[int, int], np.ndarray] = {}
        self.mask_slot: dict[int, dict[int, int]] = {}
        half = self.fov_mm / 2.0
        for ci, zs in split_items:
            if not zs:
                continue
            c = cases[ci]
            sy, sx = c.spacing[1:]
            kept = sorted(set(int(z) for z in zs))
            slot = self.mask_slot[ci] = {z: j for j, z in enumerate(kept)}
            # a negative's whole crop (side fov_mm) must be free of the class: the class dilated by
            # n pixels (a (2n+1)^2 square, as n iterations of a 3x3 dilation) marks the centres to avoid
            n_near = int(np.ceil(half / min(sy, sx))) + 1
            for k in range(1, len(class_names)):
                m = target_masks(c, class_names, k, kept)  # (A, n, H, W)
                self.masks[(ci, k)] = m
                union = m.any(0)  # (n, H, W)
                pos, neg = [], []
                for z in zs:
                    pos += [(z, cy, cx) for cy, cx in roi_item_centres(union[slot[z]])]
                n_neg = int(round(empty_fraction * len(pos)))
                if n_neg:
                    # negative centres: soft tissue whose whole crop is free of the class
                    img = c.image
                    cand = []
                    for z in zs:
                        near = ndi.maximum_filter(union[slot[z]], size=2 * n_near + 1, mode="constant", cval=False)
                        ok = (img[z] >= NEGATIVE_HU[0]) & (img[z] <= NEGATIVE_HU[1]) & ~near
                        yx = np.argwhere(ok)
                        if len(yx):
                            pick = yx[rng.integers(len(yx), size=min(4, len(yx)))]
                            cand += [(z, float(p[0]), float(p[1])) for p in pick]
                    if cand:
                        idx = rng.choice(len(cand), size=min(n_neg, len(cand)), replace=False)
                        neg = [cand[int(i)] for i in sorted(idx)]
                rep = max(1, int(class_repeat.get(class_names[k], 1)))
                a = m.shape[0]
                for z, cy, cx in pos + neg:
                    for j in (range(a) if all_annotators else [-1]):
                        self.items += [(ci, z, k, cy, cx, j)] * rep
                self.n_pos += len(pos)
                self.n_neg += len(neg)

    def __len__(self) -> int:
        return len(self.items)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def crop(self, i: int, g: torch.Generator | None = None) -> RoiCrop:
        """The crop geometry of item ``i`` (jittered with ``g`` when given and ``jitter_mm`` > 0)."""
        ci, z, k, cy, cx, _ = self.items[i]
        sy, sx = self.cases[ci].spacing[1:]
        if g is not None and self.jitter_mm > 0:
            d = (torch.rand(2, generator=g) * 2 - 1).numpy() * self.jitter_mm
            cy, cx = cy + float(d[0]) / sy, cx + float(d[1]) / sx
        return RoiCrop((cy, cx), (sy, sx), self.fov_mm, self.img_size, self.fov_mm)

    def __getitem__(self, i):
        ci, z, k, _, _, a = self.items[i]
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch * 100_003 + i) % (2**63))
        crop = self.crop(i, g if self.augment is not None else None)  # validation: no jitter
        m = self.masks[(ci, k)]
        if a < 0:
            a = int(torch.randint(m.shape[0], (1,), generator=g))
        x = torch.from_numpy(crop.from_slices(self.cases[ci].image[z], pad_value=self.norm.pad_value_hu))[None]
        # the bool slice is converted to float only on the crop's window (``RoiCrop.from_slices``)
        y = torch.from_numpy(crop.from_slices(m[a, self.mask_slot[ci][z]], pad_value=0.0) > 0.5).long()
        x, y = D.augment_and_normalize(self.augment, self.norm, x, y, g)  # g unused without augment
        y = y[None, None].float()
        if y.shape[-1] != self.mask_size:
            y = (F.interpolate(y, size=(self.mask_size, self.mask_size), mode="area") > 0.5).float()
        return x.float().contiguous(), y[0].contiguous(), k - 1
