"""The PAPER configurations on the CPU, one run, one table (issue #12's paper goals): MSA²Net per
slice and over a 512²×20 volume, MARSeg per slice, for every CPU runtime, against the official
code's forward / test loop and the CPU's fp32 GEMM rate.

    OMP_NUM_THREADS=1 GENSEG_CACHE_DIR=/tmp/genseg-paper-cache PYTHONPATH=src \\
        .venv/bin/python benchmarks/paper_speed.py [--rounds 3] [--md benchmarks/paper_speed.md]
    ... benchmarks/paper_speed.py --quick        # smoke test: tiny configs, 2 small slices, 1 round

Weights are random (seeded): speed does not depend on them, and no trained paper weights exist.
Everything runs at one thread (``OMP_NUM_THREADS=1`` is set before torch is imported when unset;
``torch.set_num_threads``, ONNX Runtime intra-op threads and OpenVINO ``INFERENCE_NUM_THREADS``
follow torch's count). ONNX files (and OpenVINO blobs) go to ``export.cache_dir()``: set
``GENSEG_CACHE_DIR`` to a folder outside the repository (the default here when it is unset:
``$TMPDIR/genseg-paper-cache``); the first run exports the paper models (minutes, 1-2 GB RAM).

Rows (``--msa2net``, default ``msa2net_paper``: 224², 9 classes; ``--marseg``, default
``marseg_paper``: mar_base, 256², 3 classes):

* **GEMM**: ``torch.mm`` of two 2048² fp32 matrices (``marseg_official_speed.gemm_rate``), once
  per round; the best is "the CPU's fp32 GEMM rate".
* **MSA²Net per slice** (model forward on the prepared 224² input, batch 1): ``official-style``
  (``model(x)`` under ``torch.no_grad``, what ``test_single_volume`` calls), ``torch fp32`` (the
  project's predictor ``forward``), ``onnxruntime`` (fp32), ``onnxruntime-int8`` (dynamic int8
  MatMul/Gemm), ``openvino`` f32 and, where the CPU computes bf16 natively, ``openvino bf16`` and
  ``torch bf16``; plus ``official-style + zoom`` (``msa2net_speed._official_style_fn``: 512² slice,
  zoom order 3 to 224², forward, argmax, zoom order 0 back) for scale.
* **MSA²Net volume** (a synthetic CT-like volume, ``phantom.make_phantom``, ``--volume-slices``
  512² slices in HU): ``official test loop`` (:func:`official_test_loop`, ``test_single_volume``'s
  per-slice steps on the HU window -125..275 scaled to [0, 1], which the official data holds
  already: not timed) against ``engine.run_volume`` (``--batch`` slices per call, as ``genseg
  segment --batch-size``) with each runtime's predictor (``make_predictor(backend=...)``): HU ->
  model grid (resize), forward, logits back to 512², arg-max.
* **MARSeg per slice** (forward on the prepared 3×256² input, batch 1): ``official-style``
  (``marseg_official_speed.official_forward`` on the full build with LDM swish and ``bmm``
  attention) against ``torch fp32`` (``MarSegPredictor.forward``), ``onnxruntime``,
  ``onnxruntime-int8``, ``openvino`` f32 and, native bf16 only, ``openvino bf16``, ``torch bf16``.

Timing: every row is built and called once (warm-up), then ``--rounds`` rounds call every row
once, in order (interleaved: load from other processes hits every row alike). Per row: median
wall seconds and median process CPU seconds (``time.process_time``; with one compute thread the
time an idle machine gives). GFLOP per call are counted once with ``torch.utils.flop_counter``
(``marseg_official_speed.count_gflop``; convolutions, matmuls, attention; elementwise ops and
norms not counted) on the torch model and used for every runtime of the same model; "% GEMM" is
GFLOP / median CPU seconds over the GEMM rate. Label agreement: the arg-max of each runtime
against torch fp32's on the same input (random weights leave near-ties: a lower bound).
Asserts nothing; prints the tables (markdown) and writes them to ``--md`` if given.

``--ort-variants`` adds ONNX Runtime session variants of the MSA²Net per-slice row (CPU memory
arena on, static batch 1, ``ORT_ENABLE_EXTENDED``) and an engine row with the arena on; ``--profile N`` prints ONNX Runtime's
per-op-type time over N calls of each model (its own profiler).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("GENSEG_CACHE_DIR", str(Path(tempfile.gettempdir()) / "genseg-paper-cache"))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from scipy.ndimage import zoom  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from backends import isa  # noqa: E402
from marseg_official_speed import count_gflop, gemm_rate, official_forward  # noqa: E402
from msa2net_speed import _official_style_fn  # noqa: E402

#: the input contract of the paper models here: Synapse's HU window to [-1, 1] (what the official
#: loop below feeds: [0, 1] data, then (x - 0.5) / 0.5), the papers' resize grid
PAPER_INPUT = {"normalization": {"kind": "hu_window", "low": -125.0, "high": 275.0, "out_min": -1.0, "out_max": 1.0},
               "grid": "resize"}


# ------------------------------------------------------------------------------------ the models


def _checkpoint(model, family: str, cfg_name: str):
    """A ``Checkpoint`` around an in-memory model (random weights) with :data:`PAPER_INPUT`."""
    from napari_genseg.models.checkpoints import Checkpoint, LoadReport

    cfg = model.config if hasattr(model, "config") else model.cfg
    names = ["background"] + [f"class{i}" for i in range(1, cfg.num_classes)]
    return Checkpoint(model=model, family=family, config_name=cfg_name, config=cfg, class_names=names,
                      input=dict(PAPER_INPUT), provenance={}, path=None, report=LoadReport())


def official_test_loop(model, volume01: np.ndarray, size: int) -> np.ndarray:
    """The per-slice steps of the official ``utils.test_single_volume`` (MSA²Net / TransUNet) on a
    CPU: each (H, W) slice of ``volume01`` (z, H, W) float32 in [0, 1] zoomed to ``size``² with
    ``scipy.ndimage.zoom(order=3)``, normalised ``(x - 0.5) / 0.5`` (as ``msa2net_speed.py``),
    batch 1 fp32 forward under ``torch.no_grad``, ``argmax(softmax(logits))``, the label map zoomed
    back with ``zoom(order=0)``. Returns the labels (z, H, W) (the official code then scores them:
    not here)."""
    out = np.zeros(volume01.shape, np.uint8)
    for ind in range(volume01.shape[0]):
        sl = volume01[ind]
        x, y = sl.shape
        if x != size or y != size:
            sl = zoom(sl, (size / x, size / y), order=3)
        inp = (torch.from_numpy(sl).unsqueeze(0).unsqueeze(0).float() - 0.5) / 0.5
        model.eval()
        with torch.no_grad():
            lab = torch.argmax(torch.softmax(model(inp), dim=1), dim=1).squeeze(0).numpy()
        if x != size or y != size:
            lab = zoom(lab, (x / size, y / size), order=0)
        out[ind] = lab
    return out


class Row:
    """One timed call: its name, section, work per call and its timings (wall, process CPU s)."""

    def __init__(self, section: str, name: str, fn, per_call: int = 1, gflop: float = float("nan")):
        self.section, self.name, self.fn, self.per_call, self.gflop = section, name, fn, per_call, gflop
        self.wall: list[float] = []
        self.cpu: list[float] = []
        self.labels = None

    def call(self, record: bool = True) -> None:
        t0, c0 = time.perf_counter(), time.process_time()
        out = self.fn()
        c, w = time.process_time() - c0, time.perf_counter() - t0
        if record:
            self.wall.append(w / self.per_call)
            self.cpu.append(c / self.per_call)
        self.labels = out

    @property
    def cpu_med(self) -> float:
        return statistics.median(self.cpu)

    @property
    def wall_med(self) -> float:
        return statistics.median(self.wall)


def _argmax(logits) -> np.ndarray:
    t = logits if isinstance(logits, torch.Tensor) else torch.from_numpy(np.asarray(logits))
    return t.float().argmax(1).numpy()


def _predictors(section: str, ckpt, bf16: bool, log) -> dict:
    """Each runtime's predictor of ``ckpt`` (``make_predictor``), by row name."""
    from napari_genseg.predictors import make_predictor

    how = [("torch fp32", "torch", "fp32"), ("onnxruntime fp32", "onnxruntime", "fp32"),
           ("onnxruntime-int8 (dynamic)", "onnxruntime-int8", "fp32"), ("openvino f32", "openvino", "fp32")]
    if bf16:
        how += [("openvino bf16 (native bf16 only)", "openvino", "bf16"),
                ("torch bf16 (native bf16 only)", "torch", "bf16")]
    preds = {}
    for name, backend, prec in how:
        t = time.perf_counter()
        p = make_predictor(ckpt, device="cpu", precision=prec, backend=backend)
        log(f"  {section}: {name} predictor ready in {time.perf_counter() - t:.1f} s "
            f"({p.backend}, {p.precision}{', ' + Path(p.onnx_path).name if hasattr(p, 'onnx_path') else ''})")
        preds[name] = p
    return preds


def _forward_rows(section: str, preds: dict, x: torch.Tensor, gflop: float, official) -> list[Row]:
    """Per-slice rows of one model: official-style, then each runtime's ``forward`` on ``x``."""
    rows = [Row(section, "official-style (torch fp32 eager)", official, gflop=gflop)]
    for name, p in preds.items():
        def run(p=p):
            with torch.inference_mode():
                return _argmax(p.forward(x))
        rows.append(Row(section, name, run, gflop=gflop))
    return rows


def _ort_session(path, arena=False, static=False, level="all"):
    """An ONNX Runtime session like ``predictors.ort.ort_session`` with one option changed."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = torch.get_num_threads()
    so.inter_op_num_threads = 1
    so.enable_cpu_mem_arena = arena
    so.graph_optimization_level = {"all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
                                   "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED}[level]
    if static:
        so.add_free_dimension_override_by_name("batch", 1)
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _ort_variant_rows(section: str, path, x: torch.Tensor, gflop: float) -> list[Row]:
    image = np.ascontiguousarray(x.numpy())
    rows = []
    for name, kw in (("onnxruntime fp32 + CPU memory arena", {"arena": True}),
                     ("onnxruntime fp32, static batch 1", {"static": True}),
                     ("onnxruntime fp32, ORT_ENABLE_EXTENDED", {"level": "extended"})):
        s = _ort_session(path, **kw)
        rows.append(Row(section, name, lambda s=s: _argmax(s.run(["logits"], {"image": image})[0]), gflop=gflop))
    return rows


def ort_profile(path, x: torch.Tensor, calls: int) -> list[tuple[str, float, int]]:
    """ONNX Runtime's own profile of ``calls`` runs of the file at ``path`` on ``x``: (op type,
    ms per call, nodes) sorted by time."""
    import json

    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = torch.get_num_threads()
    so.enable_cpu_mem_arena = False
    so.enable_profiling = True
    so.profile_file_prefix = str(Path(tempfile.gettempdir()) / "paper_speed_ort")
    s = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    image = np.ascontiguousarray(x.numpy())
    s.run(None, {"image": image})
    for _ in range(calls):
        s.run(None, {"image": image})
    prof = s.end_profiling()
    with open(prof) as f:
        events = json.load(f)
    os.unlink(prof)
    by: dict[str, list] = {}
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            op = e["args"]["op_name"]
            by.setdefault(op, [0.0, set()])
            by[op][0] += e["dur"] / 1000.0
            by[op][1].add(e["name"])
    total_calls = calls + 1
    return sorted(((op, v[0] / total_calls, len(v[1])) for op, v in by.items()), key=lambda r: -r[1])


# ----------------------------------------------------------------------------------------- main


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true",
                    help="smoke test: msa2net_tiny / marseg_tiny, 2 slices of 128², 1 round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--msa2net", default="msa2net_paper")
    ap.add_argument("--marseg", default="marseg_paper")
    ap.add_argument("--volume-slices", type=int, default=20)
    ap.add_argument("--volume-size", type=int, default=512)
    ap.add_argument("--batch", type=int, default=4, help="engine slices per call (genseg segment's default)")
    ap.add_argument("--skip", default="", help="comma list of sections to skip: msa2net, volume, marseg")
    ap.add_argument("--ort-variants", action="store_true", help="ONNX Runtime session variants (MSA²Net)")
    ap.add_argument("--profile", type=int, default=0, help="ONNX Runtime per-op profile over N calls")
    ap.add_argument("--md", default=None, help="also write the output (markdown) here")
    return ap


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    if args.quick:
        args.msa2net, args.marseg = "msa2net_tiny", "marseg_tiny"
        args.volume_slices, args.volume_size, args.rounds = 2, 128, 1
    skip = set(filter(None, args.skip.split(",")))
    torch.set_num_threads(args.threads)

    import onnxruntime as ort
    import openvino as ov

    from napari_genseg.device import cpu_bf16_support, cpu_model_name
    from napari_genseg.engine import run_to_end, run_volume
    from napari_genseg.export import cache_dir
    from napari_genseg.models import registry
    from napari_genseg.phantom import make_phantom
    from napari_genseg.predictors.ov import openvino_precision

    lines: list[str] = []

    def out(s: str = "") -> None:
        print(s, flush=True)
        lines.append(s)

    def log(s: str) -> None:
        print(s, file=sys.stderr, flush=True)

    native, why = cpu_bf16_support()
    bf16 = native and openvino_precision("bf16", warn=False) == "bf16"
    load0 = os.getloadavg()
    out(f"CPU: {cpu_model_name()}, {os.cpu_count()} logical CPUs; ISA: {isa()}; bf16 "
        f"{'native' if native else 'not native'} ({why})")
    out(f"torch {torch.__version__} (kernels {torch.backends.cpu.get_cpu_capability()}), onnxruntime "
        f"{ort.__version__}, openvino {ov.get_version().split('-')[0]}; {torch.get_num_threads()} thread(s), "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}; cache {cache_dir()}")
    out(f"Load average at start: {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}")
    out("Command: PYTHONPATH=src python benchmarks/paper_speed.py " + " ".join(sys.argv[1:] if argv is None else argv))
    rows: list[Row] = []
    gflop: dict[str, float] = {}
    extra: list[str] = []
    profiles = []

    gemm_rates: list[float] = []  # GFLOP/s by CPU time, one per call (the first is the warm-up)
    rows.append(Row("gemm", "torch.mm 2048² fp32", lambda: gemm_rates.append(gemm_rate((2048,), reps=2)[0])))

    # ---- MSA²Net: per slice and volume
    if not {"msa2net", "volume"} <= skip:
        torch.manual_seed(0)
        t = time.perf_counter()
        m = registry.create_model(args.msa2net).eval()
        ckpt = _checkpoint(m, "msa2net", args.msa2net)
        size, cin = m.config.img_size, m.config.in_chans
        x = (torch.rand(1, cin, size, size) - 0.5) / 0.5
        gflop["msa2net"] = count_gflop(lambda: m(x))
        log(f"{args.msa2net}: built in {time.perf_counter() - t:.1f} s, {gflop['msa2net']:.2f} GFLOP/slice")

        def official():
            with torch.no_grad():
                return _argmax(m(x))
        preds = _predictors(args.msa2net, ckpt, bf16, log)
        if "msa2net" not in skip:
            rows += _forward_rows(f"{args.msa2net} per slice", preds, x, gflop["msa2net"], official)
            if args.ort_variants:
                rows += _ort_variant_rows(f"{args.msa2net} per slice", preds["onnxruntime fp32"].onnx_path, x,
                                          gflop["msa2net"])
            rows.append(Row(f"{args.msa2net} per slice", f"official-style + zoom {args.volume_size}->{size}->"
                            f"{args.volume_size} (msa2net_speed.py)", _official_style_fn(m, size, args.volume_size),
                            gflop=gflop["msa2net"]))
            if args.profile:
                profiles.append((f"{args.msa2net} onnxruntime fp32", ort_profile(
                    preds["onnxruntime fp32"].onnx_path, x, args.profile)))
                profiles.append((f"{args.msa2net} onnxruntime-int8", ort_profile(
                    preds["onnxruntime-int8 (dynamic)"].onnx_path, x, args.profile)))
        if "volume" not in skip:
            ph = make_phantom(0, shape=(args.volume_slices, args.volume_size, args.volume_size),
                              spacing=(3.0, 384.0 / args.volume_size, 384.0 / args.volume_size), n_annotators=1)
            vol = ph.to_volume()
            hu = vol.data
            extra.append(f"Volume: synthetic CT (`phantom.make_phantom(0)`), {hu.shape} (z, y, x) {hu.dtype} HU "
                         f"{int(hu.min())}..{int(hu.max())}, spacing {tuple(round(s, 3) for s in vol.spacing)} mm")
            v01 = np.clip((hu.astype(np.float32) + 125.0) / 400.0, 0.0, 1.0)
            sec = f"{args.msa2net} volume {args.volume_size}²×{args.volume_slices}"
            rows.append(Row(sec, "official test loop (test_single_volume, batch 1)",
                            lambda: official_test_loop(m, v01, size), per_call=hu.shape[0], gflop=gflop["msa2net"]))
            for name, p in preds.items():
                if name.startswith("torch bf16"):
                    continue  # torch bf16 per slice is above; the engine rows are the exported runtimes
                rows.append(Row(sec, f"engine {name}, batch {args.batch}",
                                lambda p=p: run_to_end(run_volume(p, vol, batch_size=args.batch)).labels,
                                per_call=hu.shape[0], gflop=gflop["msa2net"]))
            if args.ort_variants:  # the engine's ORT predictor with the CPU memory arena on
                import copy

                p = copy.copy(preds["onnxruntime fp32"])
                p.session = _ort_session(p.onnx_path, arena=True)
                rows.append(Row(sec, f"engine onnxruntime fp32 + CPU memory arena, batch {args.batch}",
                                lambda p=p: run_to_end(run_volume(p, vol, batch_size=args.batch)).labels,
                                per_call=hu.shape[0], gflop=gflop["msa2net"]))
        del preds

    # ---- MARSeg per slice
    if "marseg" not in skip:
        from napari_genseg.models.marseg import MarSeg
        from napari_genseg.nn.ldm import AttnBlock, Encoder, ResnetBlock, swish

        t = time.perf_counter()
        torch.manual_seed(0)
        full = registry.create_model(args.marseg, inference_only=False).eval()
        import dataclasses

        lean = MarSeg(dataclasses.replace(full.cfg, inference_only=True)).eval()
        unexpected = lean.load_state_dict(full.state_dict(), strict=False).unexpected_keys
        for mod in full.kl_encoder.modules():
            if isinstance(mod, AttnBlock):
                mod.exact = True  # LDM vae.py: bmm, softmax, bmm
            if isinstance(mod, (Encoder, ResnetBlock)):
                mod.act = swish  # LDM vae.py: x * torch.sigmoid(x)
        ckpt_m = _checkpoint(lean, "marseg", args.marseg)
        s = lean.img_size
        xm = (torch.rand(1, lean.cfg.in_chans, s, s) * 2 - 1).contiguous()
        gflop["marseg"] = count_gflop(lambda: lean(xm))
        gf_off = count_gflop(lambda: official_forward(full, xm))
        with torch.no_grad():
            d = float((official_forward(full, xm) - lean(xm)).abs().max())
        extra.append(f"{args.marseg}: official-style full build ({sum(p.numel() for p in full.parameters()):,} "
                     f"parameters; {len(unexpected)} tensors not in ours) vs ours: max |logit "
                     f"diff| {d:.2e}; GFLOP per slice: official-style {gf_off:.1f}, ours {gflop['marseg']:.1f}")
        log(f"{args.marseg}: built in {time.perf_counter() - t:.1f} s")

        def official_m():
            with torch.no_grad():
                return _argmax(official_forward(full, xm))
        preds = _predictors(args.marseg, ckpt_m, bf16, log)
        r = _forward_rows(f"{args.marseg} per slice", preds, xm, gflop["marseg"], official_m)
        r[0].gflop = gf_off
        rows += r
        if args.profile:
            profiles.append((f"{args.marseg} onnxruntime fp32", ort_profile(
                preds["onnxruntime fp32"].onnx_path, xm, max(1, args.profile // 4))))
            profiles.append((f"{args.marseg} onnxruntime-int8", ort_profile(
                preds["onnxruntime-int8 (dynamic)"].onnx_path, xm, max(1, args.profile // 4))))
        del preds

    # ---- timing: warm-up, then interleaved rounds
    for r in rows:
        r.call(record=False)
    loads = []
    for i in range(args.rounds):
        for r in rows:
            r.call()
        loads.append(os.getloadavg()[0])
        log(f"round {i + 1}/{args.rounds} done, load {loads[-1]:.2f}: "
            + ", ".join(f"{r.cpu[-1]:.3f}" for r in rows) + " CPU s/slice")
    load1 = os.getloadavg()

    out(f"Load average at the end: {load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f} (1-min after each round: "
        + ", ".join(f"{v:.2f}" for v in loads) + ")")
    rate = max(gemm_rates)
    out(f"fp32 GEMM rate: {rate:.1f} GFLOP/s (torch.mm 2048² at {torch.get_num_threads()} thread(s), best of 2 "
        f"calls by CPU time, best over warm-up and rounds: " + ", ".join(f"{v:.1f}" for v in gemm_rates) + ")")
    for e in extra:
        out(e)
    out()
    out(f"Median of {args.rounds} interleaved rounds; s = seconds per slice; CPU = process CPU time.")
    sections = [s for s in dict.fromkeys(r.section for r in rows) if s != "gemm"]
    for sec in sections:
        sr = [r for r in rows if r.section == sec]
        base, ref = sr[0], next((r for r in sr if r.name.startswith(("torch fp32", "engine torch fp32"))), None)
        out()
        out(f"### {sec}")
        out()
        out("| row | wall s | CPU s | GFLOP/s (CPU) | % fp32 GEMM | × official (CPU) | × official (wall) "
            "| × torch fp32 (CPU) | labels = torch fp32 |")
        out("|---|---|---|---|---|---|---|---|---|")
        for r in sr:
            g = r.gflop / r.cpu_med
            agree = "-"
            if ref is not None and r.labels is not None and ref.labels is not None \
                    and np.shape(r.labels) == np.shape(ref.labels):
                agree = f"{100.0 * float(np.mean(np.asarray(r.labels) == np.asarray(ref.labels))):.3f} %"
            out(f"| {r.name} | {r.wall_med:.3f} | {r.cpu_med:.3f} | {g:.1f} | {100 * g / rate:.0f} % "
                f"| {base.cpu_med / r.cpu_med:.2f}× | {base.wall_med / r.wall_med:.2f}× "
                f"| {(ref.cpu_med / r.cpu_med) if ref else float('nan'):.2f}× | {agree} |")
    for name, prof in profiles:
        tot = sum(v for _, v, _ in prof)
        out()
        out(f"ONNX Runtime profile, {name}: {tot:.1f} ms per call in kernels; "
            + ", ".join(f"{op} {v:.1f} ms ({100 * v / tot:.0f} %, {n} nodes)" for op, v, n in prof[:8]))
    if args.md:
        from napari_genseg.io.atomic import atomic_path

        with atomic_path(args.md) as tmp:
            Path(tmp).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
