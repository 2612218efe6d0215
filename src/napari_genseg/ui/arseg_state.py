"""What the AR-Seg explorer keeps between runs, and when it must be dropped (no napari, no Qt).

A :class:`RunKey` names everything the votes and tokens depend on: the image (layer and voxels),
the checkpoint file, the seed, the target class and N. Runs with the same key add slices to one
:class:`ArSegResults`; a run with any other key starts a new one, so the threshold slider can
never write one image's (or checkpoint's) consensus into another's layer.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..predictors.arseg import consensus_from_votes
from ..predictors.uncertainty import disagreement_percent

__all__ = ["RunKey", "image_signature", "checkpoint_signature", "ArSegResults", "SliceState", "decode_composite"]


@dataclass(frozen=True)
class RunKey:
    """Identity of an explorer run's results (see the module docstring)."""

    image: str
    checkpoint: str
    seed: int
    target_class: int
    n_samples: int


def image_signature(layer_id: str, data: np.ndarray, spacing) -> str:
    """Layer id + SHA-1 of the voxels, their shape, dtype and spacing (mm): a re-opened or edited
    image never matches an old signature, even when napari re-uses the layer's name."""
    data = np.ascontiguousarray(data)
    h = hashlib.sha1(usedforsecurity=False)
    h.update(repr((data.shape, data.dtype.str, tuple(float(s) for s in spacing))).encode())
    h.update(memoryview(data).cast("B"))
    return f"{layer_id}:{h.hexdigest()}"


def checkpoint_signature(ckpt) -> str:
    """Config name + resolved weights path with its size and modification time (a re-trained file
    at the same path is another checkpoint)."""
    if ckpt.path is None:
        return f"{ckpt.config_name}:<in memory {id(ckpt.model):x}>"
    p = Path(ckpt.path).resolve()
    st = p.stat()
    return f"{ckpt.config_name}:{p}:{st.st_size}:{st.st_mtime_ns}"


@dataclass(frozen=True)
class SliceState:
    """What one slice's results are made of (for a redraw's undo / redo): its votes (H, W) uint8,
    its tokens (N, L) and its redrawn regions ``((y0, y1, x0, x1), tokens (N, L))``, oldest first."""

    votes: np.ndarray
    tokens: np.ndarray
    regions: tuple = ()


def decode_composite(pred, tokens: np.ndarray, regions, hw, spacing_yx, upto_scale=None) -> np.ndarray:
    """(N, H, W) bool sample masks of a slice whose ``regions`` were redrawn: decoded from
    ``tokens`` (``pred.decode_samples``), then, region by region (oldest first), the pixels of
    each box ``(y0, y1, x0, x1)`` (half-open slice pixels) decoded from that region's tokens. A
    region inside a newer region's box is not decoded (every pixel of it would be overwritten)."""
    regions = list(regions)

    def covered(i: int) -> bool:
        (y0, y1, x0, x1) = regions[i][0]
        return any(b[0] <= y0 and y1 <= b[1] and b[2] <= x0 and x1 <= b[3] for b, _ in regions[i + 1:])

    masks = pred.decode_samples(tokens, hw, spacing_yx, upto_scale=upto_scale)
    for i, ((y0, y1, x0, x1), t) in enumerate(regions):
        if not covered(i):
            masks[:, y0:y1, x0:x1] = pred.decode_samples(t, hw, spacing_yx, upto_scale=upto_scale)[:, y0:y1, x0:x1]
    return masks


class ArSegResults:
    """Votes and tokens of the slices run under one :class:`RunKey`, plus a bounded cache of what
    was decoded from the tokens: per slice, the votes after scale k (k = 1..K) and the N
    full-scale sample masks.

    votes: (Z, H, W) uint8, 0 on slices not run; tokens: {z: (N, L) int16}; regions: {z: [(box,
    tokens)]} of redraws limited to a box (``decode_composite``); run_seconds: {z: wall seconds
    per slice of the run that produced it}; version: {z: n} bumped whenever a slice's results
    change (a decode started before the change is then not stored).
    """

    def __init__(self, key: RunKey, shape: tuple[int, int, int], num_scales: int, cache_slices: int = 32):
        self.key = key
        self.n = key.n_samples
        self.target_class = key.target_class
        self.shape = tuple(shape)
        self.num_scales = int(num_scales)
        self.votes = np.zeros(shape, np.uint8)
        self.tokens: dict[int, np.ndarray] = {}
        self.regions: dict[int, list] = {}
        self.run_seconds: dict[int, float] = {}
        self.version: dict[int, int] = {}
        # z -> {"scales": {k: (H, W) uint8 votes after scale k}, "masks": packed (N, H, W) bits}
        self._decoded: OrderedDict[int, dict] = OrderedDict()
        self._cache_slices = cache_slices

    @property
    def slices(self) -> list[int]:
        """The slices run so far, sorted."""
        return sorted(self.tokens)

    def add(self, zs, votes: np.ndarray, tokens: np.ndarray) -> None:
        """Store a batch: zs (b,), votes (b, H, W) uint8, tokens (b, N, L) int16."""
        zs = [int(z) for z in zs]
        self.votes[zs] = votes
        for z, t in zip(zs, tokens):
            self.tokens[z] = t
            self.regions.pop(z, None)
            self._changed(z)

    def _changed(self, z: int) -> None:
        self._decoded.pop(z, None)
        self.version[z] = self.version.get(z, 0) + 1

    # ---- one slice's state (a redraw replaces it; its undo puts the old one back)
    def state(self, z: int) -> SliceState:
        """Slice z's current :class:`SliceState` (copies). Raises ``KeyError`` if z was not run."""
        return SliceState(self.votes[z].copy(), self.tokens[z], tuple(self.regions.get(z, ())))

    def set_state(self, z: int, st: SliceState) -> None:
        """Make ``st`` slice z's results (drops what was decoded of it)."""
        self.votes[z] = st.votes
        self.tokens[z] = st.tokens
        if st.regions:
            self.regions[z] = list(st.regions)
        else:
            self.regions.pop(z, None)
        self._changed(z)

    def redrawn(self, z: int, votes: np.ndarray, tokens: np.ndarray, box=None) -> SliceState:
        """The state of slice z after a redraw whose N samples mark ``votes`` (H, W) uint8 and
        whose tokens are ``tokens`` (N, L): everywhere (``box`` None), or only inside ``box``
        (y0, y1, x0, x1), the rest keeping its votes and decoding from the older tokens."""
        old = self.state(z)
        if box is None:
            return SliceState(np.asarray(votes, np.uint8).copy(), np.asarray(tokens).astype(np.int16))
        y0, y1, x0, x1 = (int(v) for v in box)
        v = old.votes.copy()
        v[y0:y1, x0:x1] = np.asarray(votes)[y0:y1, x0:x1]
        return SliceState(v, old.tokens, old.regions + (((y0, y1, x0, x1), np.asarray(tokens).astype(np.int16)),))

    def decode_job(self, z: int):
        """What a worker needs to decode slice z: (version, tokens, regions)."""
        return self.version.get(z, 0), self.tokens[z], tuple(self.regions.get(z, ()))

    def consensus(self, zs, threshold: float) -> np.ndarray:
        """(len(zs), H, W) uint8: the target class id where votes / N > threshold, else 0."""
        return self.consensus_of(self.votes[list(zs)], threshold)

    def consensus_of(self, votes: np.ndarray, threshold: float) -> np.ndarray:
        """Votes of any scale (..., H, W) -> the target class id where votes / N > threshold."""
        return (consensus_from_votes(votes, self.n, threshold) * self.target_class).astype(np.uint8)

    def disagreement(self, zs, threshold: float) -> np.ndarray:
        """(len(zs), H, W) uint8: % of the N samples that disagree with the consensus at
        ``threshold`` (``uncertainty.disagreement_percent``), rounded to whole percent."""
        v = self.votes[list(zs)]
        pct = disagreement_percent(v, self.n, consensus_from_votes(v, self.n, threshold))
        return np.round(pct).astype(np.uint8)

    # ---- decoded slices
    def _entry(self, z: int, create: bool = False) -> dict | None:
        e = self._decoded.get(z)
        if e is None and create:
            e = self._decoded[z] = {"scales": {}, "masks": None}
            while len(self._decoded) > self._cache_slices:
                self._decoded.popitem(last=False)
        if e is not None:
            self._decoded.move_to_end(z)
        return e

    def scale_votes(self, z: int, k: int) -> np.ndarray | None:
        """(H, W) uint8: how many of the N masks decoded after scale k mark each pixel, if decoded."""
        e = self._entry(z)
        return None if e is None else e["scales"].get(int(k))

    def sample_masks(self, z: int) -> np.ndarray | None:
        """(N, H, W) bool: the full-scale sample masks of slice z, if decoded."""
        e = self._entry(z)
        if e is None or e["masks"] is None:
            return None
        return np.unpackbits(e["masks"], axis=0, count=self.n).astype(bool)

    def sample_mask(self, z: int, k: int) -> np.ndarray | None:
        """(H, W) bool: full-scale mask of sample k (0-based) of slice z, if decoded."""
        e = self._entry(z)
        if e is None or e["masks"] is None:
            return None
        return ((e["masks"][k // 8] >> (7 - k % 8)) & 1).astype(bool)  # packbits: big-endian bits

    def missing_scales(self, z: int) -> list[int]:
        """The scales 1..K of slice z not decoded yet."""
        e = self._entry(z)
        done = set() if e is None else set(e["scales"])
        return [k for k in range(1, self.num_scales + 1) if k not in done]

    def store_scale(self, z: int, k: int, masks: np.ndarray, version: int | None = None) -> None:
        """Keep the N masks (N, H, W) bool decoded after scale k of slice z (their votes; at the
        last scale the masks themselves). Least recently used slices beyond ``cache_slices`` go.
        With ``version``, masks decoded from an older state of the slice are dropped."""
        if z not in self.tokens or (version is not None and version != self.version.get(z, 0)):
            return
        e = self._entry(z, create=True)
        e["scales"][int(k)] = masks.sum(0, dtype=np.uint8)
        if int(k) == self.num_scales:
            e["masks"] = np.packbits(masks, axis=0)
