"""Test doubles (tests only): a threshold "model" with fixed intensity bands."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn


@dataclass
class ThresholdConfig:
    """Test double config: class k where the normalised input lies in the k-th band."""

    num_classes: int = 3
    img_size: int = 32
    in_chans: int = 1
    delay_s: float = 0.0


class ThresholdNet(nn.Module):
    """Test double: logits from fixed intensity bands, plus one learnable scalar (for loaders)."""

    def __init__(self, cfg: ThresholdConfig):
        super().__init__()
        self.cfg = cfg
        self.gain = nn.Parameter(torch.tensor(20.0))

    def forward(self, x):
        import time

        if self.cfg.delay_s:
            time.sleep(self.cfg.delay_s)
        k = self.cfg.num_classes
        centers = torch.linspace(0, 1, k, device=x.device).view(1, k, 1, 1)
        return -self.gain * (x[:, :1] - centers).abs()


def register_double() -> None:
    """Register the test double's family and config (served by the segmentation predictor) once
    per process."""
    from napari_genseg.models import registry
    from napari_genseg.predictors import SegmentationPredictor, register_predictor

    if "testdouble" not in {f.name for f in registry.list_families()}:
        registry.register_family("testdouble", ThresholdConfig, ThresholdNet, "testdouble_small",
                                 description="test double")
        registry.register_config("testdouble", "testdouble_small", ThresholdConfig())
    register_predictor("testdouble", SegmentationPredictor)


def cached_vs_uncached_sampling(monkeypatch, model, emb, cls, n, prefix=None, seed=0):
    """Sample ``model`` (an ``ArSeg``) with and without the KV cache, the uncached run forced to the
    cached run's draws (so the two compare by logits within a float tolerance, independent of the CPU's
    reduction order); returns (ids cached, ids uncached, logits per drawn scale cached, uncached)."""
    from napari_genseg.models.arseg import sampling

    real_draw = sampling.draw_tokens
    seen = {True: [], False: []}
    forced = []

    def recording(cached):
        def draw(logits, temperature, top_k, generator):
            seen[cached].append(logits.float().clone())
            if cached:
                forced.append(real_draw(logits, temperature, top_k, generator))
                return forced[-1]
            return forced[len(seen[False]) - 1]
        return draw

    monkeypatch.setattr(sampling, "draw_tokens", recording(True))
    a = model.sample(emb, cls, n, generator=torch.Generator().manual_seed(seed), prefix_ids=prefix)
    monkeypatch.setattr(sampling, "draw_tokens", recording(False))
    b = model.sample(emb, cls, n, generator=torch.Generator().manual_seed(seed), use_kv_cache=False,
                     prefix_ids=prefix)
    monkeypatch.setattr(sampling, "draw_tokens", real_draw)
    return a, b, seen[True], seen[False]


#: the HU window every tiny exported-model checkpoint of the tests is saved with
TINY_INPUT = {"normalization": {"kind": "hu_window", "low": -125.0, "high": 275.0}, "grid": "resize"}


def tiny_checkpoint(tmp_path, name="msa2net_tiny", classes=("background", "liver", "spleen")):
    """A project-format checkpoint of a registered (tiny) config with seed-0 weights, naming as many
    of ``classes`` as the config has classes; -> its .safetensors path (same bytes on every call)."""
    from napari_genseg.models import registry
    from napari_genseg.models.checkpoints import save_checkpoint

    entry = registry.get_entry(name)
    torch.manual_seed(0)
    model = registry.get_family(entry.family).build(entry.config)
    return save_checkpoint(tmp_path / f"{name}.safetensors", model, entry.family, name, entry.config,
                           list(classes)[:entry.config.num_classes], TINY_INPUT)
