"""AR-Seg in region-of-interest mode: a box of the displayed (z, y, x) array -> crops at the
checkpoint's field of view -> N samples, consensus, variability and scale progression -> back
into the box, voxel for voxel.

AR-Seg's paper (Chen et al., MICCAI 2025, Sec. 3.1) segments 128² crops around LIDC nodules. A
crop checkpoint (trained by ``genseg train --model arseg_light --roi-fov-mm 48 ...``) records its
field of view in its JSON: ``input.roi = {"fov_mm": 48.0, ...}``. For a box ``z0:z1, y0:y1,
x0:x1`` (voxel indices, ends exclusive) every slice z0..z1-1 is cropped around the box centre
(``roi.crop_for_box``): a square of ``fov_mm`` (or the box's larger side in mm when the box is
larger than that: a warning then says the model sees the structure ``zoom`` times smaller than at
training), resampled to the checkpoint's image grid (``img_size``², bilinear, spacing-aware so an
anisotropic pixel gives a square crop in mm), embedded once per slice, sampled N times as one batch
(KV cache, as the whole-slice predictor), and the mask logits are resampled bilinearly from the
mask grid (same field of view at ``mask_size``²) onto the box's own pixels. Nothing outside the box
is ever written.

What a run keeps (:class:`RoiResult`) is small: votes (nz, h, w) uint8, tokens (nz, N, L) int16;
samples, scale progression and sample probabilities are decoded from the tokens on demand, on the
box's pixels.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from ..device import autocast_context
from ..preprocessing import as_float_hu
from ..roi import RoiBox, RoiCrop, crop_for_box
from .arseg import (ArSegPredictor, RedrawError, RedrawResult, cell_block, check_box, check_spacing,
                    consensus_from_votes, redraw_consensus)
from .base import PredictorOptionError
from .embedding_cache import tensor_digest
from .uncertainty import disagreement_percent

__all__ = ["ArSegRoiPredictor", "RoiResult", "roi_meta", "shipped_roi_checkpoint", "ROI_DEMO"]

#: the shipped crop checkpoint (``models/arseg_roi_demo.safetensors``) used when none is chosen
ROI_DEMO = "arseg_roi_demo"


def shipped_roi_checkpoint():
    """Path of the shipped ROI demo checkpoint (``models.checkpoints.shipped_checkpoints_dir``), or None."""
    from ..models.checkpoints import shipped_checkpoints_dir

    p = shipped_checkpoints_dir() / f"{ROI_DEMO}.safetensors"
    return p if p.is_file() else None


def roi_meta(ckpt) -> dict | None:
    """The checkpoint's ``input.roi`` entry (``{"fov_mm": ...}``) or None for a whole-slice model."""
    roi = (getattr(ckpt, "input", None) or {}).get("roi")
    return dict(roi) if isinstance(roi, dict) and roi.get("fov_mm") else None


@dataclass
class RoiResult:
    """One ROI run: per slice of the box (z0..z1-1), on the box's pixels (h = y1 - y0, w = x1 - x0).

    votes (nz, h, w) uint8: how many of the N samples mark each voxel; tokens (nz, N, L) int16;
    crops: the crop geometry of each slice (the same square for every slice of a box).
    """

    box: RoiBox
    crop: RoiCrop
    n: int
    target_class: int
    votes: np.ndarray
    tokens: np.ndarray
    elapsed: float = 0.0
    warnings: list = field(default_factory=list)

    def consensus(self, threshold: float = 0.5) -> np.ndarray:
        """(nz, h, w) bool: mean of the N sample masks > threshold (the paper's consensus)."""
        return consensus_from_votes(self.votes, self.n, threshold)

    def labels(self, threshold: float = 0.5) -> np.ndarray:
        """(nz, h, w) uint8: the target class id where the consensus holds, else 0."""
        return (self.consensus(threshold) * self.target_class).astype(np.uint8)

    def variability(self, threshold: float = 0.5) -> np.ndarray:
        """(nz, h, w) float32: % of the N samples disagreeing with the consensus at ``threshold``."""
        return disagreement_percent(self.votes, self.n, self.consensus(threshold))

    def paste(self, labels: np.ndarray, threshold: float = 0.5) -> np.ndarray:
        """Write the consensus into ``labels`` (Z, H, W) inside the box only (in place; the box's
        voxels are replaced: target class or 0). Returns ``labels``."""
        labels[self.box.slices] = self.labels(threshold)
        return labels


class ArSegRoiPredictor:
    """AR-Seg on boxes (see the module docstring) around an :class:`ArSegPredictor` (which owns the
    model, device, precision, normalisation, N, seed, target class and sampling options).

    ``fov_mm``: the field of view of the crops in mm (default: the checkpoint's ``input.roi.fov_mm``).
    """

    def __init__(self, predictor: ArSegPredictor, fov_mm: float):
        if not fov_mm or float(fov_mm) <= 0:
            raise PredictorOptionError("a region of interest needs a positive field of view in mm")
        self.base = predictor
        self.fov_mm = float(fov_mm)
        self.img_size = int(predictor.cfg.img_size)
        self.mask_size = int(predictor.cfg.mask_size)
        #: input digest -> embedding of the last run's slices (a redraw of them skips the encoder);
        #: at most ``memo_max_bytes`` (the oldest slices are dropped first: their redraw re-embeds)
        self._emb_memo: dict[str, torch.Tensor] = {}

    #: bound of the last run's remembered embeddings (a SAM-sized embedding is 4 MiB per slice)
    memo_max_bytes = 256 * 2**20

    def _remember(self, xt: torch.Tensor, emb: torch.Tensor) -> None:
        """Keep the embeddings (n, C_e, h, w) of the inputs xt (n, C, S, S) for redraws, within
        ``memo_max_bytes`` (oldest first out)."""
        self._emb_memo.update((tensor_digest(xi), ei) for xi, ei in zip(xt, emb))
        total = sum(e.numel() * e.element_size() for e in self._emb_memo.values())
        while self._emb_memo and total > self.memo_max_bytes:
            old = self._emb_memo.pop(next(iter(self._emb_memo)))
            total -= old.numel() * old.element_size()

    def release(self) -> None:
        """Free the remembered embeddings and the base predictor's batch (after a run is done with)."""
        self._emb_memo = {}
        self.base.release()

    @classmethod
    def from_checkpoint(cls, ckpt, *, fov_mm: float | None = None, device="auto", precision: str = "auto",
                        n_samples: int = 16, threshold: float = 0.5, target_class: int = 1, seed: int = 0,
                        top_k: int = 100, temperatures=None) -> "ArSegRoiPredictor":
        """ROI predictor of a loaded AR-Seg checkpoint. Raises ``PredictorOptionError`` (an
        InputError) when the checkpoint records no ROI field of view and ``fov_mm`` is not given
        (a whole-slice model sees a 48 mm crop as a tiny body: its masks would be meaningless)."""
        meta = roi_meta(ckpt)
        if fov_mm is None:
            if meta is None:
                name = ckpt.path.name if getattr(ckpt, "path", None) else ckpt.config_name
                raise PredictorOptionError(f"{name} was trained on whole slices, not on regions of interest "
                                           f"(no input.roi in its JSON); use a crop checkpoint such as arseg_roi_demo")
            fov_mm = float(meta["fov_mm"])
        base = ArSegPredictor.from_checkpoint(ckpt, device=device, precision=precision, grid_mode="resize",
                                              n_samples=n_samples, threshold=threshold, target_class=target_class,
                                              seed=seed, top_k=top_k, temperatures=temperatures)
        return cls(base, fov_mm)

    # ------------------------------------------------------------------ properties of the base
    @property
    def n(self) -> int:
        return self.base.n

    @property
    def target_class(self) -> int:
        return self.base.target_class

    @property
    def num_scales(self) -> int:
        return self.base.num_scales

    @property
    def class_names(self) -> list[str]:
        return self.base.class_names

    def crop(self, box: RoiBox, spacing_yx) -> RoiCrop:
        """The crop geometry of ``box`` on the model's image grid (``roi.crop_for_box``)."""
        return crop_for_box(box, spacing_yx, self.fov_mm, self.img_size)

    def zoom_warnings(self, box: RoiBox, spacing_yx) -> list[str]:
        """One warning (a list of one line) when ``box`` at ``spacing_yx`` (sy, sx) mm is larger than
        the checkpoint's field of view, so the model sees the structure smaller than in training;
        else []."""
        sy, sx = (float(s) for s in tuple(spacing_yx)[-2:])
        crop = self.crop(box, (sy, sx))
        if crop.zoom <= 1.0 + 1e-9:
            return []
        return [f"the box ({(box.y1 - box.y0) * sy:.1f} x {(box.x1 - box.x0) * sx:.1f} mm) is larger than "
                f"the checkpoint's {self.fov_mm:g} mm field of view: the crop covers {crop.fov_mm:.1f} mm, so "
                f"the model sees the structure {crop.zoom:.2f}x smaller than in training"]

    # ------------------------------------------------------------------ running a box
    @torch.inference_mode()
    def run(self, image: np.ndarray, spacing, box: RoiBox, batch_size: int = 4, progress=None) -> RoiResult:
        """Segment ``box`` of ``image`` (Z, H, W) HU with voxel ``spacing`` (sz, sy, sx) or (sy, sx) mm.

        Raises ``RoiError`` (an InputError) for a box outside the image. ``progress(done, total)``
        is called after each batch of slices."""
        t0 = time.perf_counter()
        box.check(np.shape(image))
        sy, sx = (float(s) for s in tuple(spacing)[-2:])
        crop = self.crop(box, (sy, sx))
        warns = self.zoom_warnings(box, (sy, sx))
        pred, zs = self.base, list(range(box.z0, box.z1))
        votes, tokens = [], []
        for s in range(0, len(zs), max(1, int(batch_size))):
            zb = zs[s:s + max(1, int(batch_size))]
            x = crop.from_slices(np.asarray(image[zb[0]:zb[-1] + 1]), pad_value=pred.norm.pad_value_hu)
            xt = pred.norm(torch.from_numpy(x)[:, None].to(pred.device))
            emb = pred.embed(xt)
            if s == 0:
                self._emb_memo = {}
            self._remember(xt, emb)
            cls = torch.full((len(zb),), pred.target_class - 1, dtype=torch.long, device=pred.device)
            opts = {"temperatures": pred.temperatures} if pred.temperatures else {}
            with autocast_context(pred.device, pred.precision):
                tok = pred.model.sample(emb, cls, n_samples=pred.n, generator=pred.generator,
                                        top_k=pred.top_k, **opts)  # (b, N, L)
            for t in tok:
                votes.append((self._logits(t, crop, box) > 0).sum(0, dtype=np.uint8))
            tokens.append(tok.to(torch.int16).cpu().numpy())
            if progress is not None:
                progress(min(s + len(zb), len(zs)), len(zs))
        return RoiResult(box, crop, pred.n, pred.target_class, np.stack(votes), np.concatenate(tokens),
                         time.perf_counter() - t0, warns)

    # ------------------------------------------------------------------ decoding tokens onto the box
    def _logits(self, tokens: torch.Tensor, crop: RoiCrop, box: RoiBox, upto_scale=None) -> np.ndarray:
        """tokens (N, L) of one slice -> (N, h, w) float32 mask logits on the box's pixels."""
        lg = self.base.decode(torch.as_tensor(np.asarray(tokens), device=self.base.device), upto_scale)
        return crop.with_size(self.mask_size).to_box(lg[:, 0].float().cpu().numpy(), box)

    @torch.inference_mode()
    def decode_samples(self, tokens: np.ndarray, crop: RoiCrop, box: RoiBox, upto_scale=None) -> np.ndarray:
        """tokens (N, L) of one slice -> (N, h, w) bool sample masks on the box (after scale
        ``upto_scale`` 1..K when given, the full mask otherwise)."""
        return self._logits(tokens, crop, box, upto_scale) > 0

    @torch.inference_mode()
    def sample_probabilities(self, tokens: np.ndarray, crop: RoiCrop, box: RoiBox) -> np.ndarray:
        """tokens (N, L) -> (N, h, w) float32 sigmoid of each sample's full-scale mask logits on the box."""
        lg = self._logits(tokens, crop, box)
        return (1.0 / (1.0 + np.exp(-lg))).astype(np.float32)

    @torch.inference_mode()
    def decode_progression(self, tokens: np.ndarray, crop: RoiCrop, box: RoiBox) -> tuple[np.ndarray, np.ndarray]:
        """tokens (N, L) -> (votes after each scale (K, h, w) uint8, the N full-scale masks (N, h, w)
        bool); ``votes[-1]`` equals the run's votes of that slice."""
        per_scale, masks = [], None
        for k in range(1, self.num_scales + 1):
            masks = self.decode_samples(tokens, crop, box, upto_scale=k)
            per_scale.append(masks.sum(0, dtype=np.uint8))
        return np.stack(per_scale), masks

    # ------------------------------------------------------------------ redraw the finer scales
    def _mask_crop(self, box: RoiBox, spacing_yx) -> RoiCrop:
        return self.crop(box, tuple(float(v) for v in spacing_yx)).with_size(self.mask_size)

    def mask_grid_transform(self, box: RoiBox, spacing) -> tuple[tuple[float, float], tuple[float, float]]:
        """napari ``scale``/``translate`` (box pixels, (y, x)) overlaying the crop's (M, M) mask grid on
        the box: mask pixel u lies at box coordinate u * scale + translate (``RoiCrop.sample_points``)."""
        sy, sx = (float(v) for v in tuple(spacing)[-2:])
        mc = self._mask_crop(box, (sy, sx))
        ys, xs = mc.sample_points()
        return ((mc.pixel_mm / sy, mc.pixel_mm / sx), (float(ys[0]) - box.y0, float(xs[0]) - box.x0))

    def to_mask_grid(self, mask_box: np.ndarray, box: RoiBox, spacing) -> np.ndarray:
        """(h, w) bool on the box's pixels -> (M, M) bool on the crop's mask grid (bilinear, Gaussian
        pre-filtered where the grid is coarser, > 0.5; off the box = background)."""
        m = np.asarray(mask_box)
        h, w = box.shape[1:]
        if m.shape != (h, w):
            raise RedrawError(f"a box mask must be ({h}, {w}) (the box's pixels), got shape {m.shape}")
        sy, sx = (float(v) for v in tuple(spacing)[-2:])
        canvas = np.zeros((box.y1 + 1, box.x1 + 1), np.float32)  # the slice up to the box: outside = 0
        canvas[box.y0:box.y1, box.x0:box.x1] = m != 0
        return self._mask_crop(box, (sy, sx)).from_slices(canvas, pad_value=0.0) > 0.5

    def from_mask_grid(self, grid_mask: np.ndarray, box: RoiBox, spacing) -> np.ndarray:
        """(M, M) bool crop mask-grid mask -> (h, w) bool on the box's pixels (bilinear > 0.5)."""
        g = np.asarray(grid_mask)
        if g.shape != (self.mask_size, self.mask_size):
            raise RedrawError(f"a mask-grid mask must be ({self.mask_size}, {self.mask_size}), got shape {g.shape}")
        sy, sx = (float(v) for v in tuple(spacing)[-2:])
        return self._mask_crop(box, (sy, sx)).to_box(np.where(g, 1.0, 0.0), box) > 0.5

    def click_cell(self, y: float, x: float, k: int, box: RoiBox, spacing) -> tuple[int, int]:
        """The scale-k cell (i, j) of box pixel (y, x): the crop mask-grid pixel (u, v) holding it
        (nearest pixel centre), then (floor(u p_k / M), floor(v p_k / M)). Raises RedrawError for a
        pixel outside the box or a scale outside 1..K."""
        pn = self.base._pn(k, allow_last=True)
        h, w = box.shape[1:]
        if not (0 <= y < h and 0 <= x < w):
            raise RedrawError(f"pixel ({y}, {x}) is outside the {h} x {w} box")
        sy, sx = (float(v) for v in tuple(spacing)[-2:])
        cu, cv = self._mask_crop(box, (sy, sx)).crop_coords(box.y0 + y, box.x0 + x)
        u = min(max(int(np.floor(cu + 0.5)), 0), self.mask_size - 1)
        v = min(max(int(np.floor(cv + 0.5)), 0), self.mask_size - 1)
        return (u * pn) // self.mask_size, (v * pn) // self.mask_size

    def encode_mask(self, mask_box: np.ndarray, box: RoiBox, spacing) -> np.ndarray:
        """(h, w) bool box mask -> (L,) int64 VQ token ids (``to_mask_grid`` + ``encode_grid``)."""
        return self.base.encode_grid(self.to_mask_grid(mask_box, box, spacing))

    @torch.inference_mode()
    def scale_mask(self, tokens: np.ndarray, k: int, box: RoiBox, spacing) -> np.ndarray:
        """(L,) token ids -> (h, w) bool box mask decoded from scales 1..k only."""
        self.base._pn(k, allow_last=True)
        sy, sx = (float(v) for v in tuple(spacing)[-2:])
        crop = self.crop(box, (sy, sx))
        return self.decode_samples(np.asarray(tokens, np.int64)[None], crop, box, upto_scale=int(k))[0]

    @torch.inference_mode()
    def redraw(self, image: np.ndarray, spacing, box: RoiBox, edited_crop_mask: np.ndarray, from_scale: int, *,
               z: int | None = None, edited_on: str = "box", target_class: int | None = None,
               n_samples: int | None = None, seed: int | None = None, region=None, clicks=(),
               previous: np.ndarray | None = None, threshold: float = 0.5,
               use_kv_cache: bool = True) -> RedrawResult:
        """``ArSegPredictor.redraw`` in ROI mode, on slice ``z`` of ``box`` (default: the box's only
        slice) of ``image`` (Z, H, W) HU with ``spacing`` (sz, sy, sx) or (sy, sx) mm.

        edited_crop_mask: (h, w) bool on the box's pixels (``edited_on="box"``) or (M, M) on the crop's
        mask grid (``"mask"``; ``mask_grid_transform``); clicks (y, x, positive) in box pixels
        (``click_cell``); ``region`` (y0, y1, x0, x1) box pixels limits the change (default: the whole
        box), ``previous`` (h, w) bool is kept outside it. The crop is embedded once (reused from the
        last ``run`` of the same box). Returns a :class:`RedrawResult` on the box's pixels (h, w).
        Raises RoiError / RedrawError (InputErrors) for a bad box, slice, scale, mask, click or option,
        a spacing that is not finite and > 0, or a slice with NaN/inf pixels.
        """
        image = np.asarray(image)
        box.check(np.shape(image))
        h, w = box.shape[1:]
        if z is None:
            if box.shape[0] != 1:
                raise RedrawError(f"box {box} holds {box.shape[0]} slices: say which one to redraw (z)")
            z = box.z0
        if not (isinstance(z, (int, np.integer)) and box.z0 <= int(z) < box.z1):
            raise RedrawError(f"slice {z!r} is not in the box's slices {box.z0}..{box.z1 - 1}")
        base = self.base
        k = from_scale
        base._pn(k)
        k = int(k)
        n, threshold, cls_id = base._check_options(n_samples, threshold, target_class)
        reg = check_box(region, (h, w))
        prev = np.zeros((h, w), bool) if previous is None else np.asarray(previous)
        if prev.shape != (h, w):
            raise RedrawError(f"previous mask {prev.shape} and box {(h, w)} differ in shape")
        sy, sx = check_spacing(tuple(spacing)[-2:])
        if not np.isfinite(image[int(z)]).all():
            raise RedrawError(f"slice {int(z)} holds NaN/inf pixels: HU must be finite")
        e = np.asarray(edited_crop_mask)
        if edited_on == "box":
            grid = self.to_mask_grid(e, box, (sy, sx))
        elif edited_on == "mask":
            if e.shape != (self.mask_size, self.mask_size):
                raise RedrawError(f"an edited mask on the mask grid must be ({self.mask_size}, {self.mask_size}), "
                                  f"got shape {e.shape}")
            grid = e != 0
        else:
            raise RedrawError(f"edited_on must be 'box' or 'mask', got {edited_on!r}")
        pn = base._pn(k)
        grid = np.array(grid, bool, copy=True)
        cells = []
        for c in clicks or ():
            if len(c) != 3:
                raise RedrawError(f"a click is (y, x, positive), got {c!r}")
            i, j = self.click_cell(c[0], c[1], k, box, (sy, sx))
            grid[cell_block(i, j, pn, self.mask_size)] = bool(c[2])
            cells.append((i, j))
        edited = base.encode_grid(grid)
        lk = int(base.model.vq.quantizer.offsets[k])
        crop = self.crop(box, (sy, sx))
        x = crop.from_slices(as_float_hu(image[int(z)]), pad_value=base.norm.pad_value_hu)
        xt = base.norm(torch.from_numpy(x)[None, None].to(base.device))
        emb = self._emb_memo.get(tensor_digest(xt[0]))
        cached = emb is not None
        emb = base.embed(xt) if emb is None else emb[None]
        t0 = time.perf_counter()
        tok = base.sample_from_prefix(emb, cls_id, n, edited[:lk], seed, use_kv_cache)
        samples = self._logits(tok, crop, box) > 0
        seconds = time.perf_counter() - t0
        consensus, var = redraw_consensus(samples, reg, prev, threshold)
        return RedrawResult(tok.long().cpu().numpy(), samples, consensus, var, k, seconds, cached, edited, cells, reg)
