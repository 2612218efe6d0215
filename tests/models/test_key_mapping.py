"""One key policy for every official importer, one prefix-stripping helper, untrained modules."""

from __future__ import annotations

import pytest
import torch

from napari_genseg.models.key_mapping import strip_prefixes


def test_strip_prefixes_nested_and_collisions():
    t = torch.zeros(1)
    sd = {"module._orig_mod.a.w": t, "_orig_mod.module.b": t, "c": t}
    assert list(strip_prefixes(sd)) == ["a.w", "b", "c"]
    assert list(strip_prefixes({"image_encoder.blocks.0.w": t}, ("image_encoder.",))) == ["blocks.0.w"]
    with pytest.raises(ValueError, match="collide"):
        strip_prefixes({"module.a": t, "a": t})


def test_every_importer_keeps_unknown_keys_for_the_report():
    """MSA²Net and AR-Seg treat a key they do not know the same way: kept (after stripping the
    wrapper prefix), so the load report shows it as unexpected; nothing is dropped silently."""
    from napari_genseg.models.arseg.importer import import_official as arseg_import
    from napari_genseg.models.msa2net.importer import import_official as msa2net_import

    t = torch.zeros(2)
    msa = {"module.decoder_2.layer_lka_1.w": t, "module.decoder_0.last_layer.weight": torch.zeros(9, 4, 1, 1),
           "module.foo.bar": t}
    _, out, _ = msa2net_import(msa)
    assert "foo.bar" in out and not any(k.startswith("module.") for k in out)
    ars = {"module.encoder.conv_in.weight": torch.zeros(32, 1, 3, 3), "module.foo.bar": t,
           "module.quantize.unknown_buffer": t, "module.quantize.ema_vocab_hit_SV": t,
           "module.prompt_encoder.x": t}
    _, out, notes = arseg_import(ars)
    assert {"foo.bar", "quantize.unknown_buffer"} <= set(out)
    assert "quantize.ema_vocab_hit_SV" not in out and "prompt_encoder.x" not in out  # documented groups
    assert any("2 unrecognised key(s) kept" in n for n in notes)


def test_untrained_modules_names_the_smallest_cover():
    from napari_genseg.models.checkpoints import untrained_modules

    m = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)))
    assert untrained_modules(m, ["1.0.weight", "1.0.bias", "1.1.weight", "1.1.bias"]) == ["1"]
    assert untrained_modules(m, ["1.0.weight", "1.0.bias", "0.bias"]) == ["0.bias", "1.0"]
    assert untrained_modules(m, []) == []
