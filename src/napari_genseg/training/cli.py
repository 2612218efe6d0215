"""``genseg train`` and ``genseg evaluate`` (added to the main parser by ``add_training_commands``).

Examples::

    genseg train --model msa2net_tiny --data phantom:8 --steps 200 --out runs/tiny.safetensors
    genseg train --config train.yaml --steps 50          # flags override the file
    torchrun --nproc_per_node=2 -m napari_genseg.cli train --device cpu ...   # DDP
    genseg pretrain-mar --model marseg_demo --init kl.safetensors --data image:CT.nii.gz --out mar.safetensors
    genseg evaluate runs/tiny.safetensors phantom:2@1000 --baseline hu --csv e.csv --json e.json
    genseg evaluate models/msa2net_demo.safetensors pairs:CT.nii.gz,LBL.nii.gz --label-map 5:1,1:2 \
        --slices 11:19 --baseline hu
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ..errors import InputError, one_line
from .config import TrainOptionError

__all__ = ["add_training_commands", "config_from_args", "TrainOptionError"]

# flag dest -> config field (flags left at None do not override the config file)
_FLAGS = {
    "model": "model", "data": "data", "label_map": "label_map", "classes": "classes", "recipe": "recipe",
    "loss": "loss", "schedule": "schedule", "epochs": "epochs", "steps": "steps", "batch_size": "batch_size",
    "lr": "lr", "weight_decay": "weight_decay", "warmup_steps": "warmup_steps", "val_fraction": "val_fraction",
    "holdout_slices": "holdout_slices", "holdout_gap": "holdout_gap", "out": "out", "resume": "resume",
    "device": "device", "precision": "precision", "seed": "seed", "workers": "workers", "grid": "grid",
    "spacing_mm": "spacing_mm", "img_size": "img_size", "val_every": "val_every", "threads": "threads",
    "max_minutes": "max_minutes", "grad_clip": "grad_clip", "time_budget_minutes": "time_budget_minutes",
    "init": "init",
    # options of one task's config (AR-Seg); a model whose task lacks them refuses them by name
    "stage": "stage", "empty_fraction": "empty_fraction", "roi_fov_mm": "roi_fov_mm", "roi_jitter_mm": "roi_jitter_mm",
    "encoder_init": "encoder_init", "segmentor_init": "segmentor_init",
}


def _read_config_file(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise TrainOptionError(f"config file not found: {p}")
    text = p.read_text()
    if p.suffix.lower() in (".yaml", ".yml"):
        import yaml

        try:
            d = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            raise TrainOptionError(f"{p.name} is not valid YAML: {_first_line(exc)}") from None
    else:
        try:
            d = json.loads(text)
        except json.JSONDecodeError as exc:
            raise TrainOptionError(f"{p.name} is not valid JSON: {exc}") from None
    if not isinstance(d, dict):
        raise TrainOptionError(f"{p.name}: expected a mapping of options")
    return d


def _first_line(exc: BaseException) -> str:
    return one_line(exc)


def config_from_args(args):
    """``genseg train`` flags over the ``--config`` file -> the config of the model's training task."""
    from .tasks import config_from_dict

    d = _read_config_file(args.config) if args.config else {}
    for dest, key in _FLAGS.items():
        v = getattr(args, dest, None)
        if v is not None:
            d[key] = v
    for item in getattr(args, "class_repeat", None) or []:
        name, _, n = item.rpartition("=")
        if not name:
            raise TrainOptionError(f"--class-repeat {item!r} is not NAME=N")
        d["class_repeat"] = {**d.get("class_repeat", {}), name: int(n)}
    if args.repeat:
        rep = dict(d.get("repeat", {}))
        for item in args.repeat:
            if "=" not in item:
                raise TrainOptionError(f"--repeat {item!r} is not SPEC=N")
            a, b = item.rsplit("=", 1)
            rep[a] = int(b)
        d["repeat"] = rep
    if args.no_augment:
        d["augment"] = {"off": True}
    if args.half:
        d["half"] = True
    if args.quiet:
        d["quiet"] = True
    return config_from_dict(d)


def cmd_train(args) -> int:
    from .data import check_data_specs
    from .loop import train

    try:  # only parses the config file and flags: its ValueError/TypeError are the user's options
        cfg = config_from_args(args)
    except InputError:
        raise
    except (ValueError, TypeError) as exc:
        raise TrainOptionError(_first_line(exc)) from None
    check_data_specs(cfg.data, cfg.label_map)
    summary = train(cfg)
    if summary.get("rank", 0) == 0:
        print(json.dumps({k: v for k, v in summary.items() if k != "rank"}, indent=2, default=str))
    return 0


def cmd_pretrain_mar(args) -> int:
    """``genseg pretrain-mar``: ``genseg train`` with MARSeg's stage 1 (MAR pre-training)."""
    from ..models import registry

    if args.stage not in (None, 1):
        raise TrainOptionError("pretrain-mar is MARSeg stage 1; use `genseg train --stage 0|2` for the others")
    args.stage = 1
    if args.model is None and not args.config:
        args.model = "marseg_demo"
    if args.model is not None and registry.get_entry(args.model).family != "marseg":
        raise TrainOptionError(f"pretrain-mar trains MARSeg configs, not {args.model}")
    return cmd_train(args)


def cmd_evaluate(args) -> int:
    from .evaluate import evaluate, format_table, write_csv, write_json

    res = evaluate(args.checkpoint, args.data, label_map=args.label_map, baseline=args.baseline,
                   slices=args.slices, device=args.device, batch_size=args.batch_size,
                   postprocess=args.postprocess)
    print(format_table(res))
    if args.csv:
        print(f"wrote {write_csv(res, args.csv)}", file=sys.stderr)
    if args.json:
        print(f"wrote {write_json(res, args.json)}", file=sys.stderr)
    return 0


def add_training_commands(sub) -> None:
    p = sub.add_parser("train", help="train a segmentation model (config file and/or flags; torchrun for DDP)")
    p.add_argument("--config", default=None, help="YAML or JSON file of TrainConfig options (flags override)")
    p.add_argument("--model", default=None, help="registered config name, e.g. msa2net_demo, msa2net_tiny")
    p.add_argument("--data", action="append", default=None,
                   help="phantom:N[@SEED][/REGION] | msd:DIR | pairs:IMG,LBL[;IMG,LBL] | image:IMG[!A:B] (unlabelled; "
                   "MARSeg stages 0-1) (repeatable)")
    p.add_argument("--label-map", default=None, help="NIfTI label ids -> class ids, e.g. 5:1,1:2 (others -> 0)")
    p.add_argument("--classes", default=None, help="class names, e.g. background,liver,spleen")
    p.add_argument("--recipe", default=None, choices=["paper", "adamw"])
    p.add_argument("--loss", default=None, choices=["bdou", "dice_ce", "ce"])
    p.add_argument("--schedule", default=None, choices=["poly", "cosine", "constant"])
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--steps", type=int, default=None, help="total optimiser steps (wins over --epochs)")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--weight-decay", type=float, default=None)
    p.add_argument("--warmup-steps", type=int, default=None)
    p.add_argument("--val-fraction", type=float, default=None, help="fraction of cases held out (by case)")
    p.add_argument("--holdout-slices", default=None,
                   help="single-case sources: validation slice block 'a:b', 'auto' (centred 8) or 'none'")
    p.add_argument("--holdout-gap", type=int, default=None, help="unused slices each side of the block (2)")
    p.add_argument("--repeat", action="append", default=None, metavar="SPEC=N",
                   help="oversample the training slices of a data spec (or 'nifti'/'phantom') N times")
    p.add_argument("--grid", default=None, choices=["spacing", "resize"])
    p.add_argument("--spacing-mm", type=float, default=None, help="grid 'spacing': in-plane mm (default 384/img_size)")
    p.add_argument("--img-size", type=int, default=None)
    p.add_argument("--val-every", type=int, default=None)
    p.add_argument("--out", default=None, help="checkpoint path (.safetensors + .json + .train.pt)")
    p.add_argument("--resume", default=None, help="continue from this checkpoint (and its .train.pt)")
    p.add_argument("--device", default=None, help="auto, cpu, cuda, cuda:1")
    p.add_argument("--precision", default=None, choices=["auto", "fp32", "fp16", "bf16"],
                   help="auto = fp32 on cpu, bf16/fp16 autocast on GPU; bf16 on a cpu only where it has "
                        "native bf16 (x86 AVX512_BF16/AMX, Arm BF16), else fp32 with a warning")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--max-minutes", type=float, default=None, help="stop cleanly (and save) after this wall time")
    p.add_argument("--grad-clip", type=float, default=None, help="clip the gradient norm (non-finite steps are skipped)")
    p.add_argument("--time-budget-minutes", type=float, default=None,
                   help="train for this wall time; the lr schedule follows the elapsed fraction")
    p.add_argument("--stage", type=int, default=None, choices=[0, 1, 2],
                   help="AR-Seg: 0 = image encoder as a segmentation network (configs with an encoder "
                   "head, e.g. arseg_ct), 1 = mask autoencoder, 2 = segmentor (frozen VQ; use --init); MARSeg: "
                   "0 = KL autoencoder, 1 = MAR pre-training, 2 = segmentation (use --init)")
    p.add_argument("--init", default=None,
                   help="start from this checkpoint's weights (fine-tuning; AR-Seg stage 2: the stage-1 checkpoint)")
    p.add_argument("--encoder-init", default=None,
                   help="AR-Seg stage 2: load the image encoder (+ head) of this stage-0 checkpoint")
    p.add_argument("--segmentor-init", default=None,
                   help="AR-Seg stage 2: warm-start the adapter + transformer from this checkpoint (tensors whose "
                        "names and shapes match; e.g. a segmentor trained on another mask latent)")
    p.add_argument("--empty-fraction", type=float, default=None,
                   help="AR-Seg: slices without the target per slice with it (per class, 0.1)")
    p.add_argument("--roi-fov-mm", type=float, default=None,
                   help="AR-Seg: train on crops of this field of view (mm) around each structure (ROI mode)")
    p.add_argument("--roi-jitter-mm", type=float, default=None,
                   help="AR-Seg ROI mode: jitter of the crop centre, mm per axis (default fov/6)")
    p.add_argument("--class-repeat", action="append", default=None, metavar="NAME=N",
                   help="AR-Seg: oversample the items of a target class N times (repeatable)")
    p.add_argument("--no-augment", action="store_true")
    p.add_argument("--half", action="store_true", help="save fp16 weights")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_train)
    pm = sub.add_parser("pretrain-mar", parents=[p], add_help=False,
                        help="MARSeg stage 1: MAR pre-training on CT slices (= train --stage 1; --init a stage-0 "
                        "checkpoint; labels not needed: image:CT.nii.gz[!A:B] data)")
    pm.set_defaults(func=cmd_pretrain_mar)

    p = sub.add_parser("evaluate", help="Dice/IoU/HD95 of a checkpoint on labelled volumes (+ HU baseline)")
    p.add_argument("checkpoint")
    p.add_argument("data", nargs="+", help="phantom:N[@SEED][/REGION] | msd:DIR | pairs:IMG,LBL[;IMG,LBL]")
    p.add_argument("--label-map", default=None)
    p.add_argument("--baseline", default=None, choices=["hu", "hu-auto", "both"],
                   help="hu: 40..150 HU window (contrast CT); hu-auto: window at the scan's soft-tissue mode; both")
    p.add_argument("--slices", default=None, help="score only these slices of every case, e.g. 11:19")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--csv", default=None)
    p.add_argument("--json", default=None)
    p.add_argument("--postprocess", action="store_true",
                   help="also score the mask after the checkpoint's 3-D post-processing (method "
                        "model_postprocessed, beside the raw model rows)")
    p.set_defaults(func=cmd_evaluate)
