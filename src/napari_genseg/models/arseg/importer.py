"""Official-checkpoint import for AR-Seg: a pure ``state_dict -> (overrides, state_dict, notes)``.

Recognised sources (after stripping ``module.`` / ``_orig_mod.``), detected by sentinel keys:

* the official mask autoencoder (``codes/MaskVQ``, a Lightning ``VQModel``): ``encoder.*``,
  ``decoder.*``, ``quant_conv.*``, ``post_quant_conv.*``, ``quantize.*``;
* the official two-stage model (``codes/MaskAR`` ``Net2NetTransformer``): the same autoencoder under
  ``first_stage_model.``, the MedSAM encoder under ``cond_stage_model.``, the GPT under
  ``transformer.``;
* a SAM / MedSAM checkpoint: ``image_encoder.*`` (prompt encoder and mask decoder are dropped).

Key table (official -> ours):

    encoder.* / decoder.* / quant_conv.* / post_quant_conv.*  -> vq.<same>
    quantize.embedding.weight                                  -> vq.quantizer.codebook.weight
    quantize.quant_resi.qresi_ls.{i}.{weight,bias}             -> vq.quantizer.phi.{i}.{weight,bias}
    quantize.ema_vocab_hit_SV                                  -> dropped (training statistic)
    image_encoder.* (SAM/MedSAM), cond_stage_model.*            -> image_encoder.* (unchanged)
    transformer.*                                              -> dropped (see notes)
    prompt_encoder.*, mask_decoder.* (SAM/MedSAM)              -> dropped (not part of AR-Seg)
    anything else                                              -> kept unchanged (unexpected)

Unknown keys follow the one policy of :mod:`napari_genseg.models.key_mapping`: they are kept as
they are, so the load report lists them as unexpected and ``genseg import`` does not write the
checkpoint without ``--allow-partial``.

The official segmentor transformer is not imported: it has no class conditioning (the paper's AdaLN),
a different adapter (256 tokens, per-sample SVD) and an off-by-one attention mask, so its weights do
not describe this model; stage 2 must be trained.
"""

from __future__ import annotations

import re

import torch

from ..key_mapping import KeyMap, strip_prefixes

__all__ = ["import_official", "OFFICIAL_VQ_PREFIXES"]

OFFICIAL_VQ_PREFIXES = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.", "quantize.")

_PHI = re.compile(r"^quantize\.quant_resi\.qresi_ls\.(\d+)\.(weight|bias)$")
_PHI_SHARED = re.compile(r"^quantize\.quant_resi\.qresi\.(weight|bias)$")
_PHI_NON_SHARED = re.compile(r"^quantize\.quant_resi\.(\d+)\.(weight|bias)$")


#: official quantiser entries that are training statistics, not weights
_QUANT_STATS = ("quantize.ema_vocab_hit_SV",)


def _map_vq_key(k: str) -> str | None:
    """Official autoencoder key (no prefix) -> our key, or None when not recognised."""
    if k == "quantize.embedding.weight":
        return "vq.quantizer.codebook.weight"
    m = _PHI.match(k) or _PHI_NON_SHARED.match(k)
    if m:
        return f"vq.quantizer.phi.{m.group(1)}.{m.group(2)}"
    m = _PHI_SHARED.match(k)
    if m:
        return f"vq.quantizer.phi.0.{m.group(1)}"
    if k.startswith(("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")):
        return "vq." + k
    return None


def _vq_overrides(sd: dict, notes: list[str]) -> dict:
    """Config fields read off the autoencoder's tensor shapes."""
    ov: dict = {}
    cb = sd.get("vq.quantizer.codebook.weight")
    if cb is not None:
        ov["vocab_size"], ov["code_dim"] = int(cb.shape[0]), int(cb.shape[1])
    w = sd.get("vq.encoder.conv_in.weight")
    if w is not None:
        ch = int(w.shape[0])
        ov["vq_ch"] = ch
        ov["vq_norm_groups"] = 32  # LDM GroupNorm (not stored in the checkpoint)
        mult, level = [], 0
        while f"vq.encoder.down.{level}.block.0.conv1.weight" in sd:
            mult.append(int(sd[f"vq.encoder.down.{level}.block.0.conv1.weight"].shape[0]) // ch)
            level += 1
        if mult:
            ov["vq_ch_mult"] = tuple(mult)
            blocks = 0
            while f"vq.encoder.down.0.block.{blocks}.conv1.weight" in sd:
                blocks += 1
            ov["vq_num_res_blocks"] = blocks
    z = sd.get("vq.quant_conv.weight")
    if z is not None:
        ov["vq_z_channels"] = int(z.shape[1])
    phis = {k.split(".")[3] for k in sd if k.startswith("vq.quantizer.phi.")}
    if phis:
        ov["phi_shared"] = len(phis)
    if "vq_ch_mult" in ov:
        # the official quantiser works on an 8 x 8 latent with scales 1..8
        ov["mask_size"] = 8 * 2 ** (len(ov["vq_ch_mult"]) - 1)
        notes.append(f"mask autoencoder: mask {ov['mask_size']}², ch {ov['vq_ch']}, "
                     f"ch_mult {ov['vq_ch_mult']}, V {ov.get('vocab_size')}, "
                     f"code dim {ov.get('code_dim')}")
    return ov


def _sam_overrides(sd: dict, notes: list[str]) -> dict:
    ov: dict = {"encoder_kind": "sam_vit_b", "train_image_encoder": False}
    pe = sd.get("image_encoder.pos_embed")
    pw = sd.get("image_encoder.patch_embed.proj.weight")
    if pe is not None and pw is not None:
        patch = int(pw.shape[-1])
        ov["sam_patch_size"] = patch
        ov["img_size"] = int(pe.shape[1]) * patch
        ov["sam_width"] = int(pe.shape[-1])
    depth = 0
    while f"image_encoder.blocks.{depth}.attn.qkv.weight" in sd:
        depth += 1
    if depth:
        ov["sam_depth"] = depth
        glob = []
        grid = int(pe.shape[1]) if pe is not None else None
        win = None
        rel = [sd.get(f"image_encoder.blocks.{i}.attn.rel_pos_h") for i in range(depth)]
        if grid is not None and all(r is not None for r in rel):
            for i, r in enumerate(rel):
                n = int(r.shape[0])
                if n == 2 * grid - 1:
                    glob.append(i)
                else:
                    win = (n + 1) // 2
            ov["sam_global_attn_indexes"] = tuple(glob)
            if win is not None:
                ov["sam_window_size"] = win
            if "sam_width" in ov:
                ov["sam_heads"] = ov["sam_width"] // int(rel[0].shape[1])
    neck = sd.get("image_encoder.neck.0.weight")
    if neck is not None:
        ov["embed_dim"] = int(neck.shape[0])
    notes.append(f"image encoder: SAM ViT ({depth} blocks, global attention in "
                 f"{ov.get('sam_global_attn_indexes')}), keys loaded unchanged")
    return ov


def import_official(state_dict: dict) -> tuple[dict, dict, list[str]]:
    """Map an official AR-Seg / MaskVQ / SAM / MedSAM state dict onto :class:`ArSeg` keys.

    Returns (config overrides, our state dict, notes). Pure: no I/O, tensors are not copied.
    Wrapper prefixes are stripped first; unrecognised keys stay in the returned dict unchanged
    (see the module docstring). Raises ``ValueError`` when two keys collapse onto one name.
    """
    sd = strip_prefixes(state_dict)
    km = KeyMap()
    notes: list[str] = []
    for k, v in sd.items():
        if k.startswith("first_stage_model."):
            k = k[len("first_stage_model."):]
        elif k.startswith("cond_stage_model."):
            km.put("image_encoder." + k[len("cond_stage_model."):], v)
            continue
        if k.startswith(("image_encoder.", "vq.", "segmentor.")):  # SAM/MedSAM, or already our layout
            km.put(k, v)
        elif k.startswith(("prompt_encoder.", "mask_decoder.")):
            km.drop("SAM prompt encoder / mask decoder")
        elif k.startswith("transformer."):
            km.drop("official segmentor transformer")
        elif k in _QUANT_STATS:
            km.drop("quantiser training statistics")
        elif k.startswith(OFFICIAL_VQ_PREFIXES) and _map_vq_key(k) is not None:
            km.put(_map_vq_key(k), v)
        else:
            km.keep_unknown(k, v)
    out = km.out

    overrides: dict = {}
    if any(k.startswith("vq.") for k in out):
        overrides.update(_vq_overrides(out, notes))
    if any(k.startswith("image_encoder.") for k in out):
        overrides.update(_sam_overrides(out, notes))
    notes += km.notes()
    if km.dropped.get("official segmentor transformer"):
        notes.append("the official segmentor has no AdaLN class conditioning, a 256-token adapter "
                     "and an off-by-one causal mask: train stage 2 (token_loss) instead")
    missing = [p for p in ("image_encoder.", "vq.", "segmentor.") if not any(k.startswith(p) for k in out)]
    if missing:
        notes.append("not in this checkpoint (left untrained): " + ", ".join(m[:-1] for m in missing))
    return overrides, out, notes
