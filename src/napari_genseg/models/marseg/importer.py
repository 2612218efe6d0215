"""Official-checkpoint import for MARSeg: pure ``state_dict -> (overrides, state_dict, notes)``.

Three official formats (after stripping ``module.`` / ``_orig_mod.``), told apart by sentinel keys:

* **fine-tuned MARSeg** (Ewha-AI/MARSeg ``main_marseg.py``: ``ckpt['model']``, ``ckpt['args']`` an
  ``argparse.Namespace``): ``mar.*``, ``encoder.*``, ``quant_conv.*``, the GPAF lists,
  ``decoder.*``. Sentinels: any ``mar.`` key, ``decoder.cls_seg.weight``.
* **MAR pre-training** (LTH14/mar ``main_mar.py``: ``ckpt['model']`` and ``ckpt['model_ema']``, plus
  ``args``): the MAR keys without the ``mar.`` prefix. Sentinel: ``z_proj.weight``.
* **KL-16 tokenizer** (LDM AutoencoderKL, MAR's ``kl16.ckpt``: ``ckpt['model']``): ``encoder.*``,
  ``decoder.*`` (the LDM decoder), ``quant_conv.*`` (2z -> 2z), ``post_quant_conv.*``. Sentinel:
  ``encoder.conv_in.weight`` without any MARSeg key.

Key table (official -> ours), applied to the fine-tuned format; the MAR format gains ``mar.``; the
KL-16 format keeps only ``encoder.*`` -> ``kl_encoder.*``::

    encoder.*                           -> kl_encoder.*
    initial_projection_modules.{i}.*    -> gpaf.{i}.proj_in.*
    spatial_attention_modules.{i}.*     -> gpaf.{i}.spatial.*
    channel_attention_modules.{i}.*     -> gpaf.{i}.channel.*
    fusion_projection_modules.{i}.*     -> gpaf.{i}.proj_out.*
    decoder.*                           -> head.*
    quant_conv.*, mar.*                 -> unchanged

The configuration is read from tensor shapes wherever they tell it (widths, depths, classes,
buffer and sequence lengths, diffusion head size, GPAF sizes) and from ``args`` for what shapes
cannot tell (``layer_indices``, attention heads via ``args.model``, dropouts, mask ratio, sampling
steps); where both exist and disagree the shapes win and a note says so.

The official loader (``initialize_mar_model``) looks for ``'state_dict'`` and keeps keys starting
with ``encoder_pos_embed_learned``, ``z_proj.``, ``encoder_blocks.``, ``decoder.``, ``quant_conv.``:
a standard MAR checkpoint (``model`` / ``model_ema``) therefore loads nothing, ``decoder.`` matches
no MAR key, and it prints "Loaded" anyway. Here every load returns a report of what was loaded,
missing and unexpected, and loading nothing is an error.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from pathlib import Path

import torch

from ..checkpoints import CheckpointError, LoadReport, load_state_dict_report, strip_prefixes
from .config import OFFICIAL_LATENT_SCALE, MarSegConfig

__all__ = [
    "FORMATS",
    "OFFICIAL_KEY_TABLE",
    "MAR_VARIANTS",
    "detect_format",
    "import_official",
    "import_kl16_autoencoder",
    "export_official",
    "read_official_checkpoint",
    "load_official",
]

#: format name -> what it is
FORMATS = {
    "marseg": "fine-tuned MARSeg (Ewha-AI/MARSeg)",
    "mar": "MAR pre-training (LTH14/mar)",
    "kl16": "KL-16 tokenizer (LDM AutoencoderKL)",
    "ours": "napari-genseg MARSeg layout",
}

#: official fine-tuned MARSeg key prefix (regex) -> ours
OFFICIAL_KEY_TABLE: tuple[tuple[str, str], ...] = (
    (r"^encoder\.", "kl_encoder."),
    (r"^initial_projection_modules\.(\d+)\.", r"gpaf.\1.proj_in."),
    (r"^spatial_attention_modules\.(\d+)\.", r"gpaf.\1.spatial."),
    (r"^channel_attention_modules\.(\d+)\.", r"gpaf.\1.channel."),
    (r"^fusion_projection_modules\.(\d+)\.", r"gpaf.\1.proj_out."),
    (r"^decoder\.", "head."),
)
_INVERSE_TABLE: tuple[tuple[str, str], ...] = (
    (r"^kl_encoder\.", "encoder."),
    (r"^gpaf\.(\d+)\.proj_in\.", r"initial_projection_modules.\1."),
    (r"^gpaf\.(\d+)\.spatial\.", r"spatial_attention_modules.\1."),
    (r"^gpaf\.(\d+)\.channel\.", r"channel_attention_modules.\1."),
    (r"^gpaf\.(\d+)\.proj_out\.", r"fusion_projection_modules.\1."),
    (r"^head\.", "decoder."),
)

#: LTH14/mar model names -> (width, depth, heads); heads are not stored in a state dict
MAR_VARIANTS = {"mar_base": (768, 12, 12), "mar_large": (1024, 16, 16), "mar_huge": (1280, 20, 16)}

#: MARSeg keys the segmentation forward never runs (dropped for an inference build)
_TRAINING_ONLY = (r"^mar\.diffloss\.", r"^mar\.diffusion_pos_embed_learned$", r"^mar\.mask_token$",
                  r"^mar\.class_emb\.", r"^head\.fpn_convs\.[1-9]\d*\.")

#: what a MAR / MARSeg checkpoint always implies (not in its tensors)
_OFFICIAL_CONSTANTS = {"latent_scale": OFFICIAL_LATENT_SCALE, "noise_schedule": "cosine",
                       "diffusion_steps": 1000}


def _rename(key: str, table) -> str:
    for pattern, repl in table:
        new, n = re.subn(pattern, repl, key, count=1)
        if n:
            return new
    return key


def detect_format(state_dict: dict) -> str:
    """``"marseg"``, ``"mar"``, ``"kl16"`` or ``"ours"`` from sentinel keys; ValueError otherwise."""
    keys = list(state_dict)
    if any(k.startswith(("kl_encoder.", "gpaf.", "head.")) for k in keys):
        return "ours"
    if any(k.startswith(("mar.", "initial_projection_modules.")) for k in keys) \
            or "decoder.cls_seg.weight" in state_dict:
        return "marseg"
    if "z_proj.weight" in state_dict or any(k.startswith("encoder_blocks.") for k in keys):
        return "mar"
    if "encoder.conv_in.weight" in state_dict:
        return "kl16"
    raise ValueError("not a MARSeg, MAR or KL-16 state dict: none of the sentinel keys mar.*, "
                     "decoder.cls_seg.weight, z_proj.weight, encoder.conv_in.weight is present")


def _count(sd: dict, fmt: str) -> int:
    n = 0
    while any(k.startswith(fmt.format(n)) for k in sd):
        n += 1
    return n


def _args_dict(args) -> dict:
    if args is None:
        return {}
    if isinstance(args, dict):
        return dict(args)
    return dict(vars(args))


def _kl_overrides(sd: dict, p: str, notes: list[str]) -> dict:
    """Tokenizer fields from LDM encoder keys under prefix ``p``."""
    w = sd[f"{p}conv_in.weight"]
    ch, in_chans = int(w.shape[0]), int(w.shape[1])
    levels = _count(sd, p + "down.{}.block.0.")
    mult = tuple(int(sd[f"{p}down.{i}.block.0.conv1.weight"].shape[0]) // ch for i in range(levels))
    ov = {
        "in_chans": in_chans,
        "vae_ch": ch,
        "vae_ch_mult": mult,
        "vae_num_res_blocks": _count(sd, p + "down.0.block.{}."),
        "vae_attn_levels": tuple(i for i in range(levels) if f"{p}down.{i}.attn.0.q.weight" in sd),
        "vae_embed_dim": int(sd[f"{p}conv_out.weight"].shape[0]) // 2,
        "vae_norm_groups": 32,
    }
    notes.append(f"KL tokenizer: ch {ch}, ch_mult {mult}, {ov['vae_num_res_blocks']} blocks per level, "
                 f"attention at levels {ov['vae_attn_levels']}, z {ov['vae_embed_dim']} "
                 f"(GroupNorm groups not stored: LDM's 32)")
    return ov


def _mar_overrides(sd: dict, a: dict, vae_embed_dim: int | None, vae_stride: int | None,
                   notes: list[str]) -> dict:
    """MAR fields from ``mar.*`` keys (and ``args`` where shapes are silent)."""
    zw = sd["mar.z_proj.weight"]
    width, token_dim = int(zw.shape[0]), int(zw.shape[1])
    depth = _count(sd, "mar.encoder_blocks.{}.")
    dec_depth = _count(sd, "mar.decoder_blocks.{}.")
    if depth != dec_depth:
        raise ValueError(f"MAE encoder has {depth} blocks but the decoder {dec_depth}; "
                         "MARSeg needs equal depths")
    ov: dict = {"mar_width": width, "mar_depth": depth}
    fc1 = sd.get("mar.encoder_blocks.0.mlp.fc1.weight")
    if fc1 is not None:
        ov["mlp_ratio"] = float(fc1.shape[0]) / width
    # heads: not stored
    model = a.get("model")
    if model in MAR_VARIANTS and MAR_VARIANTS[model][:2] == (width, depth):
        ov["mar_heads"] = MAR_VARIANTS[model][2]
        notes.append(f"MAR variant {model} (args.model): {ov['mar_heads']} heads")
    else:
        match = [n for n, (w, d, _) in MAR_VARIANTS.items() if (w, d) == (width, depth)]
        if match:
            ov["mar_heads"] = MAR_VARIANTS[match[0]][2]
            notes.append(f"MAR width {width}, depth {depth} = {match[0]}: {ov['mar_heads']} heads")
        elif width % 64 == 0:
            ov["mar_heads"] = width // 64
            notes.append(f"MAR width {width}, depth {depth} is no official variant: assumed "
                         f"{ov['mar_heads']} heads of 64 (heads are not stored in a state dict)")
        else:
            notes.append(f"MAR width {width}: attention heads unknown (not stored); "
                         "kept from the base config")
    # latent token layout
    emb = vae_embed_dim or a.get("vae_embed_dim")
    if emb is None:
        p16 = math.isqrt(token_dim // 16) if token_dim % 16 == 0 else 0
        emb = 16 if p16 and p16 * p16 * 16 == token_dim else token_dim
    patch = math.isqrt(token_dim // emb) if token_dim % emb == 0 else 0
    if patch * patch * emb != token_dim:
        raise ValueError(f"token width {token_dim} is not vae_embed_dim {emb} x patch_size²")
    ov["vae_embed_dim"], ov["patch_size"] = int(emb), int(patch)
    # sequence and buffer
    pos_len = int(sd["mar.encoder_pos_embed_learned"].shape[1])
    dpe = sd.get("mar.diffusion_pos_embed_learned")
    stride = vae_stride or int(a.get("vae_stride", 16))
    if dpe is not None:
        seq = int(dpe.shape[1])
        how = "diffusion_pos_embed_learned"
    elif "img_size" in a:
        seq = (int(a["img_size"]) // stride // patch) ** 2
        how = "args.img_size"
    else:
        seq = pos_len - int(a.get("buffer_size", 64))
        how = "assumed buffer of 64 tokens"
    grid = math.isqrt(max(seq, 0))
    if grid * grid != seq or seq > pos_len:
        raise ValueError(f"cannot split {pos_len} positions into a square token grid and a buffer ({how})")
    ov["buffer_size"] = pos_len - seq
    ov["img_size"] = grid * patch * stride
    if "img_size" in a and int(a["img_size"]) != ov["img_size"]:
        notes.append(f"args.img_size {a['img_size']} disagrees with the weights "
                     f"({ov['img_size']}); weights win")
    if "buffer_size" in a and int(a["buffer_size"]) != ov["buffer_size"]:
        notes.append(f"args.buffer_size {a['buffer_size']} disagrees with the weights ({ov['buffer_size']})")
    notes.append(f"MAR: width {width}, {depth}+{depth} blocks, {seq} tokens ({grid}x{grid}, patch {patch}) "
                 f"+ {ov['buffer_size']} buffer, img_size {ov['img_size']} (sequence from {how})")
    ce = sd.get("mar.class_emb.weight")
    if ce is not None:
        ov["class_num"] = int(ce.shape[0])
    n_res = _count(sd, "mar.diffloss.net.res_blocks.{}.")
    if n_res:
        ov["diffloss_depth"] = n_res
        ov["diffloss_width"] = int(sd["mar.diffloss.net.input_proj.weight"].shape[0])
        for name, fld in (("diffloss_d", "diffloss_depth"), ("diffloss_w", "diffloss_width")):
            if name in a and int(a[name]) != ov[fld]:
                notes.append(f"args.{name} {a[name]} disagrees with the weights ({ov[fld]}); weights win")
    for name, fld, conv in (("attn_dropout", "attn_dropout", float), ("proj_dropout", "proj_dropout", float),
                            ("label_drop_prob", "label_drop_prob", float),
                            ("mask_ratio_min", "mask_ratio_min", float),
                            ("diffusion_batch_mul", "diffusion_batch_mul", int)):
        if name in a:
            ov[fld] = conv(a[name])
    steps = a.get("num_sampling_steps")
    if steps is not None and str(steps).isdigit():
        ov["num_sampling_steps"] = int(steps)
    return ov


def _seg_overrides(sd: dict, a: dict, depth: int, width: int, notes: list[str]) -> dict:
    ov: dict = {"num_classes": int(sd["head.cls_seg.weight"].shape[0])}
    n = _count(sd, "gpaf.{}.proj_in.0.")
    if "layer_indices" in a:
        li = tuple(int(i) for i in a["layer_indices"])
        notes.append(f"layer_indices {li} (args)")
    else:
        li = tuple(range(depth - n, depth))
        notes.append(f"no args: layer_indices {li} assumed (the released script's default, the last "
                     f"{n} blocks; the model class default is (2, 5, 8, 11))")
    if len(li) != n:
        raise ValueError(f"{len(li)} layer indices for {n} GPAF modules")
    ov["layer_indices"] = li
    ov["fuse_dim"] = int(sd["gpaf.0.proj_out.0.weight"].shape[0])
    ov["ca_reduction"] = width // int(sd["gpaf.0.channel.fc1.weight"].shape[0])
    ov["sa_kernel"] = int(sd["gpaf.0.spatial.conv.weight"].shape[-1])
    notes.append(f"segmentation: {ov['num_classes']} classes, GPAF on blocks {li}, fuse {ov['fuse_dim']}")
    return ov


def import_official(state_dict: dict, args=None, inference_only: bool = True
                    ) -> tuple[dict, dict, list[str]]:
    """Map an official MARSeg / MAR / KL-16 state dict onto :class:`MarSeg` keys.

    Args:
        state_dict: tensors of ``ckpt['model']`` (or ``ckpt['model_ema']``).
        args: the checkpoint's ``args`` (argparse.Namespace or dict), or None.
        inference_only: for a fine-tuned MARSeg checkpoint, drop (and report) what segmentation
            never runs (diffusion head, its position embedding, mask token, class embedding, the
            head's unused 3x3 convs) and build the inference model; False keeps them. MAR
            checkpoints always build the full model (their diffusion head is the point).

    Returns (config overrides, our state dict, notes). Pure: no I/O, tensors are not copied.
    Raises ValueError for an unrecognised or inconsistent state dict.
    """
    sd = strip_prefixes(dict(state_dict))
    fmt = detect_format(sd)
    try:
        return _import(sd, fmt, _args_dict(args), inference_only)
    except KeyError as exc:
        raise ValueError(f"incomplete {FORMATS[fmt]} state dict: {exc.args[0]} is missing") from None


def _import(sd: dict, fmt: str, a: dict, inference_only: bool) -> tuple[dict, dict, list[str]]:
    notes = [f"format: {FORMATS[fmt]}"]
    if fmt == "ours":
        return {}, sd, notes
    dropped: dict[str, int] = {}

    def drop(group: str) -> None:
        dropped[group] = dropped.get(group, 0) + 1

    overrides: dict = {}
    if fmt == "kl16":
        out = {}
        for k, v in sd.items():
            if k.startswith("encoder."):
                out["kl_encoder." + k[len("encoder."):]] = v
            else:
                drop(f"{k.split('.')[0]}.* (segmentation uses the KL-16 encoder only)")
        overrides.update(_kl_overrides(out, "kl_encoder.", notes))
    else:
        if fmt == "mar":
            full = {"mar." + k: v for k, v in sd.items()}
        else:
            full = {_rename(k, OFFICIAL_KEY_TABLE): v for k, v in sd.items()}
        vae_embed = vae_stride = None
        if "kl_encoder.conv_in.weight" in full:
            overrides.update(_kl_overrides(full, "kl_encoder.", notes))
            vae_embed = overrides["vae_embed_dim"]
            vae_stride = 2 ** (len(overrides["vae_ch_mult"]) - 1)
        if "quant_conv.weight" in full:
            vae_embed = int(full["quant_conv.weight"].shape[0])
        overrides.update(_mar_overrides(full, a, vae_embed, vae_stride, notes))
        if fmt == "marseg":
            overrides.update(_seg_overrides(full, a, overrides["mar_depth"], overrides["mar_width"], notes))
        overrides.update(_OFFICIAL_CONSTANTS)
        overrides["vae_decoder_attn_levels"] = ()
        overrides["inference_only"] = bool(inference_only) if fmt == "marseg" else False
        out = full
        if overrides["inference_only"]:
            out = {}
            for k, v in full.items():
                if any(re.match(p, k) for p in _TRAINING_ONLY):
                    drop("the diffusion head" if k.startswith("mar.diffloss.") else
                         "the head's unused 3x3 convs" if k.startswith("head.fpn_convs.") else
                         k.split(".", 1)[1])
                else:
                    out[k] = v
            notes.append("inference build: what segmentation never runs is dropped")
    for group, n in dropped.items():
        notes.append(f"dropped {n} key(s): {group}")
    return overrides, out, notes


def import_kl16_autoencoder(state_dict: dict) -> tuple[dict, dict, list[str]]:
    """Map a KL-16 (LDM AutoencoderKL) state dict onto :class:`KLAutoencoder` keys (stage 0/1).

    Keeps ``encoder.*``, ``decoder.*``, ``quant_conv.*``, ``post_quant_conv.*``; LDM's
    ``loss.logvar`` becomes ``logvar``; the rest of ``loss.*`` (LPIPS network, discriminator) is
    dropped. Returns (MarSegConfig overrides for the ``vae_*`` fields, state dict, notes).
    """
    sd = strip_prefixes(dict(state_dict))
    if "encoder.conv_in.weight" not in sd or "post_quant_conv.weight" not in sd:
        raise ValueError("not a KL autoencoder state dict: encoder.conv_in.weight or "
                         "post_quant_conv.weight missing")
    notes = [f"format: {FORMATS['kl16']} (whole autoencoder)"]
    out, dropped = {}, 0
    for k, v in sd.items():
        if k.startswith(("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")):
            out[k] = v
        elif k == "loss.logvar":
            out["logvar"] = v.reshape(())
        else:
            dropped += 1
    ov = _kl_overrides(sd, "encoder.", notes)
    ov["vae_decoder_attn_levels"] = tuple(i for i in range(len(ov["vae_ch_mult"]))
                                          if f"decoder.up.{i}.attn.0.q.weight" in sd)
    ov["latent_scale"] = OFFICIAL_LATENT_SCALE
    if dropped:
        notes.append(f"dropped {dropped} key(s): loss.* (LPIPS / discriminator of LDM training)")
    return ov, out, notes


def export_official(state_dict: dict, fmt: str = "marseg") -> dict:
    """Our :class:`MarSeg` state dict -> official keys (inverse of :func:`import_official`; for
    tests and round trips). ``fmt`` "marseg": the fine-tuned layout; "mar": the ``mar.*`` keys
    without the prefix (LTH14/mar); "kl16": ``kl_encoder.*`` as ``encoder.*``."""
    if fmt == "marseg":
        return {_rename(k, _INVERSE_TABLE): v for k, v in state_dict.items()}
    if fmt == "mar":
        return {k[len("mar."):]: v for k, v in state_dict.items() if k.startswith("mar.")}
    if fmt == "kl16":
        return {"encoder." + k[len("kl_encoder."):]: v for k, v in state_dict.items()
                if k.startswith("kl_encoder.")}
    raise ValueError(f"unknown format {fmt!r}; one of marseg, mar, kl16")


def read_official_checkpoint(path: str | os.PathLike, weights: str = "model"
                             ) -> tuple[dict, dict | None, list[str]]:
    """Read an official ``.pth`` with ``torch.load(weights_only=True)``, ``argparse.Namespace``
    being the one class allowed besides tensors and containers (MARSeg and MAR keep their
    ``args`` in it).

    Args:
        path: the file.
        weights: which entry holds the weights: "model" (default) or "model_ema" (LTH14/mar's
            EMA weights, used for its reported generation results).

    Returns (state dict with ``module.`` / ``_orig_mod.`` stripped, ``vars(args)`` or None, notes).
    Raises CheckpointError (file missing, unreadable, not a checkpoint, no such entry).
    """
    import argparse

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle refusals, truncation, non-torch files
        raise CheckpointError(f"cannot read {path.name} as a PyTorch checkpoint: {exc}") from exc
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path.name} does not hold a checkpoint dict")
    notes = []
    if weights not in ("model", "model_ema"):
        raise ValueError(f"weights must be 'model' or 'model_ema', got {weights!r}")
    if weights in obj and isinstance(obj[weights], dict):
        sd = obj[weights]
        other = [k for k in ("model", "model_ema") if k != weights and k in obj]
        notes.append(f"weights: ckpt[{weights!r}]" + (f" (the file also has {other[0]!r})" if other else ""))
    elif "state_dict" in obj and isinstance(obj["state_dict"], dict) and weights == "model":
        sd = obj["state_dict"]
        notes.append("weights: ckpt['state_dict']")
    elif all(isinstance(v, torch.Tensor) for v in obj.values()) and weights == "model":
        sd = obj
        notes.append("weights: the file is a bare state dict")
    else:
        raise CheckpointError(f"{path.name} has no {weights!r} entry (keys: {', '.join(map(str, obj))})")
    if not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{path.name}: ckpt[{weights!r}] is not a state dict of tensors")
    args = obj.get("args")
    if args is not None and not isinstance(args, (argparse.Namespace, dict)):
        args = None
    if args is not None:
        notes.append("configuration read from ckpt['args']")
    return strip_prefixes(sd), (_args_dict(args) if args is not None else None), notes


def load_official(path: str | os.PathLike, base: MarSegConfig | None = None, weights: str = "model",
                  inference_only: bool = True):
    """Read, map and load an official checkpoint of any of the three formats into a MARSeg.

    Args:
        path: ``.pth`` file (see :func:`read_official_checkpoint`).
        base: configuration for what the checkpoint does not say (default: ``marseg_paper``).
        weights / inference_only: see :func:`read_official_checkpoint` / :func:`import_official`.

    Returns (model in eval mode, config, :class:`LoadReport` with the importer's notes). Raises
    CheckpointError when the file is not such a checkpoint or no tensor of it fits the model.
    """
    from .model import MarSeg

    sd, args, read_notes = read_official_checkpoint(path, weights)
    try:
        overrides, mapped, notes = import_official(sd, args, inference_only)
        cfg = dataclasses.replace(base or MarSegConfig(), **overrides)
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"{Path(path).name}: {exc}") from exc
    model = MarSeg(cfg)
    report: LoadReport = load_state_dict_report(model, mapped)
    report.notes += read_notes + notes
    if not report.loaded:
        raise CheckpointError(f"{Path(path).name}: no tensor fits the MARSeg model ({report.summary()})")
    return model.eval(), cfg, report
