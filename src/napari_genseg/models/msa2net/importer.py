"""Official MSA²Net checkpoint import (the checkpoint filter).

Official code: https://github.com/xmindflow/MSA-2Net (MIT). Its checkpoints are raw
``torch.save(model.state_dict())`` files (``module.``-prefixed when trained with DataParallel;
stripped first by :func:`~napari_genseg.models.key_mapping.strip_prefixes`). Our module names
equal the official ones, so the key table below is empty by design: ``backbone.backbone.*`` are
timm's MaxViT keys, ``backbone.conv.*`` is the official backbone's unused 1->3 channel conv,
``decoder_{3,2,1,0}.*`` the decoder stages.

Which variant a checkpoint holds is told by sentinel keys: ``decoder_2.tran_layer1.*`` = the
paper's DAE-Former decoder_2; ``decoder_2.layer_lka_1.*`` = the released code (whose duplicated
``MyDecoderLayerDAEFormer.__init__`` builds LKA blocks everywhere and skips MASAG in decoder_2).

Unknown keys follow the one policy of :mod:`napari_genseg.models.key_mapping`: kept unchanged, so
the load report lists them as unexpected (this importer drops nothing).
"""

from __future__ import annotations

from ..checkpoints import CheckpointError
from ..key_mapping import strip_prefixes

__all__ = ["OFFICIAL_KEY_PREFIXES", "import_official", "export_official", "detect_variant"]

#: official key prefix -> our key prefix (longest match first). Empty: names are identical.
OFFICIAL_KEY_PREFIXES: dict[str, str] = {}

_SENTINELS = {
    "paper": "decoder_2.tran_layer1.",
    "released": "decoder_2.layer_lka_1.",
}
#: the official model is built for this encoder at 224² (decoder base size 7 is hard-coded)
_OFFICIAL_ENCODER = "maxvit_rmlp_small_rw_224"
_OFFICIAL_ENCODER_WIDTH = 768
_OFFICIAL_IMG_SIZE = 224


def _rename(key: str, table: dict[str, str]) -> str:
    for old in sorted(table, key=len, reverse=True):
        if key.startswith(old):
            return table[old] + key[len(old):]
    return key


def detect_variant(state_dict: dict) -> str:
    """``"paper"`` or ``"released"`` from the sentinel keys.

    Raises :class:`~napari_genseg.models.checkpoints.CheckpointError` (a ValueError) when neither
    or both are present."""
    found = [v for v, prefix in _SENTINELS.items() if any(k.startswith(prefix) for k in state_dict)]
    if len(found) != 1:
        what = "both" if found else "neither"
        raise CheckpointError(
            f"not an official MSA2Net state dict: {what} of the sentinel keys "
            f"{_SENTINELS['paper']}* (paper) / {_SENTINELS['released']}* (released) present"
        )
    return found[0]


def import_official(state_dict: dict) -> tuple[dict, dict, list[str]]:
    """Map an official MSA²Net state dict onto this package's model (pure function, no I/O).

    Returns ``(config_overrides, state_dict, notes)``: build ``Msa2NetConfig(**overrides)`` (or
    replace the fields of a registered config), then load the returned state dict. Wrapper prefixes
    (``module.``, ``_orig_mod.``) are stripped first; keys are only renamed, never dropped: anything
    unknown stays and shows up as *unexpected* in the load report. Raises ``CheckpointError`` for a
    state dict that is not an official MSA²Net one.
    """
    state_dict = strip_prefixes(state_dict)
    variant = detect_variant(state_dict)
    notes = [f"variant {variant!r} (sentinel keys {_SENTINELS[variant]}*)"]
    last = state_dict.get("decoder_0.last_layer.weight")
    if last is None or getattr(last, "ndim", 0) != 4:
        raise CheckpointError("not an official MSA2Net state dict: no decoder_0.last_layer.weight [K, C, 1, 1]")
    num_classes = int(last.shape[0])
    notes.append(f"num_classes={num_classes} (decoder_0.last_layer.weight)")

    norm = state_dict.get("backbone.backbone.norm.weight")
    if norm is not None and int(norm.shape[0]) != _OFFICIAL_ENCODER_WIDTH:
        notes.append(
            f"backbone width {int(norm.shape[0])} differs from {_OFFICIAL_ENCODER} "
            f"({_OFFICIAL_ENCODER_WIDTH}); expect shape mismatches"
        )
    notes.append(
        "token_layout 'official': reproduces the official raw .view between token and image "
        "layouts (MASAG/LKA see a scrambled geometry); weights trained that way need it"
    )
    notes.append(
        "official inputs were (HU clipped to [-125, 275] scaled to [0, 1]) then normalised "
        "with mean 0.5 / std 0.5, i.e. in [-1, 1] (torchvision Normalize in trainer.py / utils.py)"
    )
    unused = [
        k for k in state_dict
        if k.startswith("backbone.conv.") or k.startswith("decoder_3.") and not k.startswith("decoder_3.layer_up.")
        or variant == "released" and k.startswith("decoder_2.ag_attn.")
    ]
    if unused:
        notes.append(
            f"{len(unused)} entries belong to modules the official forward never runs "
            "(backbone.conv, decoder_3 skip/blocks"
            + (", decoder_2.ag_attn" if variant == "released" else "")
            + "); kept (keep_unused_modules=True) so the load is exact"
        )

    overrides = {
        "encoder": _OFFICIAL_ENCODER,
        "img_size": _OFFICIAL_IMG_SIZE,
        "in_chans": 1,
        "num_classes": num_classes,
        "variant": variant,
        "token_layout": "official",
        "keep_unused_modules": True,
        "mlp_ratio": 4,
        "channel_attn_heads": 8,
    }
    out = {_rename(k, OFFICIAL_KEY_PREFIXES): v for k, v in state_dict.items()}
    renamed = sum(1 for k in state_dict if _rename(k, OFFICIAL_KEY_PREFIXES) != k)
    if renamed:
        notes.append(f"renamed {renamed} keys")
    return overrides, out, notes


def export_official(state_dict: dict) -> dict:
    """Inverse key mapping: our state dict -> official key names (for tests and round trips)."""
    inverse = {ours: official for official, ours in OFFICIAL_KEY_PREFIXES.items()}
    return {_rename(k, inverse): v for k, v in state_dict.items()}
