"""MARSeg on the CPU, per 256² slice, against an official-style forward: one run, one table.

    PYTHONPATH=src .venv/bin/python benchmarks/marseg_official_speed.py --threads 1 [--rounds 3]
        [--batch 8] [--config marseg_paper] [--md benchmarks/marseg_speed.md]

Rows (``--config``, default ``marseg_paper``: mar_base, 256², 3 classes, random weights; speed does
not depend on them):

(a) **official-style**: the forward of Ewha-AI/MARSeg ``models/marseg.py`` + ``models/mar/
    mar_layers.py`` (``return_all=True``), re-created in :func:`official_forward` on the full build
    (diffusion head, mask token, class embedding and the 3 unused FPN convs in memory, 244.6 M
    parameters), with the work the official code does: the LDM encoder's swish as
    ``x * sigmoid(x)`` and its attention as two ``bmm`` (``vae.py``), MAR patchify through ``einsum``, zero buffer then assignment, all 12 encoder and
    12 decoder block outputs kept and each passed through the final norm, encoder_norm once more on
    the last output, GPAF on ``permute().contiguous()`` copies with the channel-attention MLP run
    twice (avg and max), the FPN's bilinear resizes of equal-sized maps, ``torch.no_grad``,
    batch 1, fp32, NCHW. Input: the normalised tensor (no pre/post-processing counted).
(b) **ours, fp32**: ``MarSegPredictor`` (the lean inference build, loaded from (a)'s weights) on one
    real CT slice: ``set_image`` (HU -> 256² model grid -> [-1, 1] x 3) + ``predict`` (forward,
    back to the slice grid, argmax): more work than (a) is timed for.
(c) **ours, batched**: ``engine.run_volume`` with ``--batch`` slices per call (as ``genseg segment
    --batch-size``), fp32 and bf16, time per slice (the predictor feeds the model
    ``MarSegPredictor.cpu_chunk`` slices at a time on the CPU).
(d) **ours, bf16**: (b) with ``precision="bf16"`` (opt-in; honoured where ``device.cpu_native_bf16``
    says the CPU computes bf16 natively, else it runs fp32 and the row says so).

Each row runs in its own worker process (its own allocator state, as in a user's process: the
official code's process never ran anything else), built and warmed up once; each round times (a),
(b), (d), (c fp32), (c bf16) once, in that order (round-robin: load from other processes hits
every row alike). Printed per row: wall seconds per
slice (median and best over rounds) and the thread's CPU seconds (``time.thread_time``; with one
thread this is the wall time of an idle machine, the figure that survives a shared CPU), GFLOP/s
and % of the fp32 GEMM rate. GFLOP per slice are counted with ``torch.utils.flop_counter``
(the CPU's fused attention kernel is registered with torch's SDPA formula; elementwise ops and
norms are not counted). GEMM rate: ``torch.mm`` of two ``--gemm-n``² fp32 matrices at the same
thread count (best over n = 1024, 2048, 3072, CPU time).

Agreement of the argmax masks, bf16 vs fp32, on the real CT (``ct_abdomen_small``, voxels of the
slice grid): (1) the shipped demo checkpoint (``--demo``, trained weights), all slices, at the
demo config; (2) ``--config`` with random weights on the batched slices (random weights leave many
near-ties, so this row is a lower bound: say so). Also (a) vs (b) in fp32 (same weights: the same
function). Asserts nothing; prints the table (markdown) and writes it to ``--md`` if given.
"""

from __future__ import annotations

import argparse
import functools
import multiprocessing as mp
import os
import statistics
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

from napari_genseg.device import cpu_model_name

# ------------------------------------------------------------------------------------ the machine


def cpu_isa() -> str:
    """The SIMD / matrix extensions relevant to torch's kernels, from the CPU flags."""
    from napari_genseg.device import _proc_cpu_flags

    flags = _proc_cpu_flags() or set()
    found = [name for flag, name in (("avx2", "AVX2"), ("avx512f", "AVX-512"), ("avx512_bf16", "AVX512_BF16"),
                                     ("amx_tile", "AMX"), ("amx_bf16", "AMX-BF16")) if flag in flags]
    return ", ".join(found) or "none of AVX2/AVX-512/AMX"


def gemm_rate(sizes=(1024, 2048, 3072), dtype=torch.float32, reps: int = 6) -> tuple[float, float]:
    """GFLOP/s of ``torch.mm`` on two n x n matrices, the best over ``sizes`` and ``reps`` calls
    each: (by thread CPU time, by wall time)."""
    best_cpu = best_wall = 0.0
    for n in sizes:
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        torch.mm(a, b)
        for _ in range(reps):
            t0, c0 = time.perf_counter(), time.thread_time()
            torch.mm(a, b)
            c, w = time.thread_time() - c0, time.perf_counter() - t0
            best_cpu, best_wall = max(best_cpu, 2 * n**3 / c / 1e9), max(best_wall, 2 * n**3 / w / 1e9)
    return best_cpu, best_wall


def count_gflop(fn) -> float:
    """GFLOP of one call of ``fn`` (torch's flop counter; the CPU flash-attention op registered)."""
    from torch.utils import flop_counter as fc

    op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    if op not in fc.flop_registry:
        @fc.register_flop_formula(op)
        def _sdpa_cpu(query, key, value, *args, out_shape=None, **kwargs) -> int:
            return fc.sdpa_flop_count(query, key, value)  # (shapes: get_raw=False)

    with torch.no_grad(), fc.FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops() / 1e9


# ------------------------------------------------------------------------------ official-style forward


def official_forward(model, x: torch.Tensor) -> torch.Tensor:
    """The official MARSeg segmentation forward (``MARSeg.forward`` without a label, with
    ``MAR.forward_mae_encoder/decoder(return_all=True)``), op for op, on our full-build modules.

    ``model``: a :class:`~napari_genseg.models.marseg.MarSeg` built with ``inference_only=False``
    whose KL-encoder attention blocks run the LDM ``bmm`` form (``exact=True``) and whose
    encoder blocks use LDM's ``swish`` (``act``). Shapes: x [B, 3,
    S, S] -> logits [B, C, S, S]. Blocks (timm ``Block`` in the official code: pre-LN, SDPA
    attention) are ours: the same operations.
    """
    mar = model.mar
    k_buf = mar.buffer_size
    z = model.kl_encoder(x)
    z = model.quant_conv(z)
    class_embedding = mar.fake_latent.repeat(z.size(0), 1)
    z = z * 0.2325
    # ---- forward_mae_encoder(z, class_embedding, return_all=True)
    bsz, c, h, w = z.shape
    p = mar.patch_size
    t = z.reshape(bsz, c, h // p, p, w // p, p)
    t = torch.einsum("nchpwq->nhwcpq", t).reshape(bsz, (h // p) * (w // p), c * p * p)
    t = mar.z_proj(t)
    b, _, dim = t.shape
    t = torch.cat([torch.zeros(b, k_buf, dim, device=t.device), t], dim=1)
    t[:, :k_buf] = class_embedding.unsqueeze(1)
    t = mar.z_proj_ln(t + mar.encoder_pos_embed_learned)
    enc_all = []
    for block in mar.encoder_blocks:
        t = block(t)
        enc_all.append(t)
    enc_all = [mar.encoder_norm(o) for o in enc_all]
    enc_all = [o[:, k_buf:] for o in enc_all]
    t = mar.encoder_norm(t)
    # ---- forward_mae_decoder(t, return_all=True)
    y = mar.decoder_embed(t)
    y = y + mar.decoder_pos_embed_learned
    dec_all = []
    for block in mar.decoder_blocks:
        y = block(y)
        dec_all.append(y)
    dec_all = [mar.decoder_norm(o) for o in dec_all]
    dec_all = [o[:, k_buf:] for o in dec_all]
    # ---- GPAF (initial projection, spatial and channel attention, fusion projection)
    fused = []
    for i, idx in enumerate(model.layer_indices):
        g = model.gpaf[i]
        enc_feat, dec_feat = enc_all[idx], dec_all[idx]
        bs, seq_len, d = enc_feat.shape
        hh = ww = int(seq_len**0.5)
        e4 = enc_feat.permute(0, 2, 1).contiguous().reshape(bs, d, hh, ww)
        d4 = dec_feat.permute(0, 2, 1).contiguous().reshape(bs, d, hh, ww)
        proj = g.proj_in(torch.cat([e4, d4], dim=1))
        avg_out = torch.mean(proj, dim=1, keepdim=True)
        max_out, _ = torch.max(proj, dim=1, keepdim=True)
        sa_out = proj * torch.sigmoid(g.spatial.conv(torch.cat([avg_out, max_out], dim=1)))
        ch = g.channel
        avg_c = ch.fc2(torch.relu(ch.fc1(F.adaptive_avg_pool2d(proj, 1))))
        max_c = ch.fc2(torch.relu(ch.fc1(F.adaptive_max_pool2d(proj, 1))))
        ca_out = proj * torch.sigmoid(avg_c + max_c)
        fused.append(g.proj_out(torch.cat([sa_out, ca_out], dim=1)))
    # ---- FPNHead
    head = model.head
    laterals = [conv(f) for conv, f in zip(head.lateral_convs, fused)]
    out = laterals[0]
    for i in range(1, len(laterals)):
        laterals[i] = F.interpolate(laterals[i], size=out.shape[2:], mode="bilinear", align_corners=False)
        out = out + laterals[i]
    out = head.cls_seg(head.fpn_convs[0](out))
    scale = model.img_size / out.shape[-1]
    return F.interpolate(out, scale_factor=scale, mode="bilinear", align_corners=False)


# -------------------------------------------------------------------------------------- helpers


def _checkpoint(model, cfg_name: str, cfg, input_contract: dict):
    """A ``Checkpoint`` around an in-memory model (random weights) with the demo's input contract."""
    from napari_genseg.models.checkpoints import Checkpoint, LoadReport

    names = ["background", "liver", "spleen"][: cfg.num_classes] + [f"class{i}" for i in range(3, cfg.num_classes)]
    return Checkpoint(model=model, family="marseg", config_name=cfg_name, config=cfg, class_names=names,
                      input=input_contract, provenance={}, path=None, report=LoadReport())


def _labels(pred, vol, zs, batch: int) -> np.ndarray:
    from napari_genseg.engine import run_to_end, run_volume

    res = run_to_end(run_volume(pred, vol, slices=zs, batch_size=batch))
    return res.labels[zs]


def _agree(a: np.ndarray, b: np.ndarray) -> str:
    diff = int((a != b).sum())
    return f"{100.0 * (1 - diff / a.size):.3f} % ({diff} of {a.size:,} voxels differ)"


class Row:
    """Timings of one benchmark row: per-slice wall and thread-CPU seconds."""

    def __init__(self, name: str, fn, per_call: int) -> None:
        self.name, self.fn, self.per_call = name, fn, per_call
        self.wall: list[float] = []
        self.cpu: list[float] = []

    def time(self) -> None:
        t0, c0 = time.perf_counter(), time.thread_time()
        self.fn()
        self.cpu.append((time.thread_time() - c0) / self.per_call)
        self.wall.append((time.perf_counter() - t0) / self.per_call)


# ----------------------------------------------------------------------------------------- main


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch", type=int, default=8, help="slices per call on the batched path (c)")
    ap.add_argument("--config", default="marseg_paper")
    ap.add_argument("--demo", default="models/marseg_demo.safetensors", help="trained checkpoint for agreement")
    ap.add_argument("--ct", default="../shared/data/real/ct-abdomen/ct_abdomen_small.nii.gz")
    ap.add_argument("--first-slice", type=int, default=11, help="first of the --batch slices timed")
    ap.add_argument("--gemm-n", default="1024,2048,3072", help="matrix sides of the GEMM-rate test")
    ap.add_argument("--md", default=None, help="also write the table (markdown) here")
    return ap


def _setup(args, key: str) -> dict:
    """What row ``key`` ("a", "b", "d", "c32", "c16" or "all") needs: the full build (seeded random
    weights, official LDM swish and bmm attention for (a)), predictors on its weights, the CT."""
    from napari_genseg.io import load_volume
    from napari_genseg.models import registry
    from napari_genseg.models.checkpoints import load_checkpoint
    from napari_genseg.nn.ldm import AttnBlock, Encoder, ResnetBlock, swish
    from napari_genseg.predictors import MarSegPredictor

    torch.manual_seed(0)
    full = registry.create_model(args.config, inference_only=False).eval()
    for m in full.kl_encoder.modules():
        if isinstance(m, AttnBlock):
            m.exact = True  # LDM vae.py: bmm, softmax, bmm
        if isinstance(m, (Encoder, ResnetBlock)):
            m.act = swish  # LDM vae.py: x * torch.sigmoid(x) (ours: F.silu)
    demo = load_checkpoint(args.demo)
    ckpt = _checkpoint(full, args.config, full.cfg, demo.input)
    env = {"demo": demo, "vol": load_volume(args.ct)}
    env["zs"] = list(range(args.first_slice, args.first_slice + args.batch))
    env["one"], env["sp"] = env["vol"].data[env["zs"][:1]], env["vol"].spacing[1:]
    p32 = MarSegPredictor.from_checkpoint(ckpt, device="cpu", precision="fp32")
    p32.set_image(env["one"], env["sp"])
    env["x"] = p32._x.contiguous()  # the normalised model input [1, 3, S, S] of that slice (NCHW)
    if key in ("a", "all"):
        env["full"] = full
    if key in ("b", "c32", "all"):
        env["p32"] = p32
    if key in ("d", "c16", "all"):
        env["p16"] = MarSegPredictor.from_checkpoint(ckpt, device="cpu", precision="bf16")
    return env


def _row_fn(key: str, env: dict, batch: int):
    """The call timed for row ``key``."""
    if key == "a":
        full, x = env["full"], env["x"]

        def run():
            with torch.no_grad():
                official_forward(full, x)
        return run
    if key in ("b", "d"):
        pred, one, sp = env["p32" if key == "b" else "p16"], env["one"], env["sp"]

        def run():
            pred.set_image(one, sp)
            pred.predict()
        return run
    pred = env["p32" if key == "c32" else "p16"]
    return lambda: _labels(pred, env["vol"], env["zs"], batch)


def _worker(key: str, argv, conn) -> None:
    """One row's process: build, warm up, then answer "time" with (wall s, thread CPU s) of one call."""
    args = _parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    fn = _row_fn(key, _setup(args, key), args.batch)
    fn()  # warm-up (oneDNN primitives, allocator)
    import gc

    gc.collect()
    conn.send("ready")
    while conn.recv() == "time":
        t0, c0 = time.perf_counter(), time.thread_time()
        fn()
        conn.send((time.perf_counter() - t0, time.thread_time() - c0))


def main(argv=None) -> int:
    ap = _parser()
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from napari_genseg.device import cpu_bf16_support
    from napari_genseg.predictors import MarSegPredictor

    argv = sys.argv[1:] if argv is None else list(argv)

    lines: list[str] = []

    def out(s: str = "") -> None:
        print(s, flush=True)
        lines.append(s)

    native, why = cpu_bf16_support()
    load0 = os.getloadavg()
    out(f"CPU: {cpu_model_name()}; ISA: {cpu_isa()}; {os.cpu_count()} logical CPUs; torch {torch.__version__} "
        f"(kernels {torch.backends.cpu.get_cpu_capability()}), {torch.get_num_threads()} thread(s); "
        f"bf16: {'native' if native else 'not native'} ({why})")
    out(f"Load average at start: {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}")
    out("Command: PYTHONPATH=src python benchmarks/marseg_official_speed.py " + " ".join(sys.argv[1:]))
    sizes = tuple(int(n) for n in args.gemm_n.split(","))
    g32_cpu, g32_wall = gemm_rate(sizes)
    g16_cpu, g16_wall = gemm_rate(sizes, torch.bfloat16) if native else (float("nan"), float("nan"))
    out(f"GEMM rate (torch.mm n x n, n in {'/'.join(map(str, sizes))}, {args.threads} thread(s), best of 6 calls "
        f"each): fp32 {g32_cpu:.1f} GFLOP/s (CPU time; {g32_wall:.1f} by wall), bf16 {g16_cpu:.1f} GFLOP/s")

    # ---- correctness, FLOPs and agreement in this process (timing happens in one process per row)
    env = _setup(args, "all")
    full, p32, p16, x = env["full"], env["p32"], env["p16"], env["x"]
    n_full = sum(p.numel() for p in full.parameters())
    n_lean = sum(p.numel() for p in p32.model.parameters())
    with torch.no_grad():
        ref = official_forward(full, x)
        with torch.inference_mode():
            ours = p32.forward(x)
    maxdiff = float((ref - ours).abs().max())
    same_argmax = float((ref.argmax(1) == ours.argmax(1)).float().mean()) * 100
    gf_official = count_gflop(functools.partial(official_forward, full, x))
    gf_ours = count_gflop(functools.partial(p32.model, x))
    out(f"Parameters in memory: official-style {n_full:,} (fp32); ours {n_lean:,} "
        f"(fp32; the bf16 predictor holds its Linear/Conv weights in bf16)")
    out(f"GFLOP per slice: official-style {gf_official:.1f}, ours {gf_ours:.1f}; "
        f"official-style vs ours fp32 (same weights): max |logit diff| {maxdiff:.2e}, argmax equal on "
        f"{same_argmax:.4f} % of the 256² grid")
    prec16 = p16.precision
    vol, zs, demo = env["vol"], env["zs"], env["demo"]
    agree = [f"Argmax agreement, {prec16} vs fp32, slice-grid voxels of {os.path.basename(args.ct)}:"]
    lab32 = _labels(p32, vol, zs, args.batch)
    lab16 = _labels(p16, vol, zs, args.batch)
    counts = np.bincount(lab32.ravel(), minlength=env["full"].num_classes).tolist()
    agree.append(f"- {args.config}, RANDOM weights, slices {zs[0]}-{zs[-1]}: {_agree(lab32, lab16)}; fp32 voxels "
                 f"per class {counts} (random weights: uninformative when one class takes nearly every voxel)")
    allz = list(range(vol.shape[0]))
    d32 = MarSegPredictor.from_checkpoint(demo, device="cpu", precision="fp32")
    d16 = MarSegPredictor.from_checkpoint(demo, device="cpu", precision="bf16")
    dl32, dl16 = _labels(d32, vol, allz, args.batch), _labels(d16, vol, allz, args.batch)
    fg = dl32 > 0
    agree.append(f"- {demo.config_name} TRAINED weights ({os.path.basename(args.demo)}), all {len(allz)} slices: "
                 f"{_agree(dl32, dl16)}; fp32 foreground voxels {int(fg.sum())}, of them {_agree(dl32[fg], dl16[fg])}")
    del env, full, p32, p16, ref, ours, d32, d16

    # ---- timing: one worker process per row (its own allocator state, as a user's process has),
    # driven round-robin from here
    names = {"a": "(a) official-style, fp32 eager, batch 1",
             "b": "(b) ours MarSegPredictor, fp32 eager, batch 1",
             "d": f"(d) ours MarSegPredictor, {prec16} (opt-in), batch 1",
             "c32": f"(c) ours run_volume, fp32, batch {args.batch}",
             "c16": f"(c) ours run_volume, {prec16}, batch {args.batch}"}
    ctx = mp.get_context("spawn")
    workers = {}
    for key in names:  # one at a time: building the 245 M-parameter model is memory-hungry
        here, there = ctx.Pipe()
        proc = ctx.Process(target=_worker, args=(key, argv, there), daemon=True)
        proc.start()
        assert here.recv() == "ready", key
        workers[key] = (proc, here)
    rows = {k: Row(names[k], None, args.batch if k.startswith("c") else 1) for k in names}
    for i in range(args.rounds):
        for k, (_, conn) in workers.items():
            conn.send("time")
            wall, cpu = conn.recv()
            rows[k].wall.append(wall / rows[k].per_call)
            rows[k].cpu.append(cpu / rows[k].per_call)
        print(f"  round {i + 1}/{args.rounds}: " + ", ".join(f"{r.cpu[-1]:.2f}" for r in rows.values())
              + " s CPU/slice", file=sys.stderr, flush=True)
    for proc, conn in workers.values():
        conn.send("stop")
        proc.join(60)
    load1 = os.getloadavg()

    rows = list(rows.values())
    a = rows[0]
    a_med, a_cpu = statistics.median(a.wall), statistics.median(a.cpu)
    out()
    out(f"{args.config}, random weights, per 256² slice, {args.rounds} rounds (round-robin over one process per "
        f"row), {args.threads} thread(s); load average at the end {load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f}")
    out()
    out("| row | wall s/slice median | wall best | CPU s/slice median | CPU best | GFLOP/s (CPU best) "
        "| % of fp32 GEMM | speed-up vs (a) (CPU median) | speed-up vs (a) (wall median) |")
    out("|---|---|---|---|---|---|---|---|---|")
    for i, r in enumerate(rows):
        gf = gf_official if i == 0 else gf_ours
        rate = gf / min(r.cpu)
        out(f"| {r.name} | {statistics.median(r.wall):.2f} | {min(r.wall):.2f} | {statistics.median(r.cpu):.2f} "
            f"| {min(r.cpu):.2f} | {rate:.1f} | {100 * rate / g32_cpu:.0f} % | "
            f"{a_cpu / statistics.median(r.cpu):.2f}× | {a_med / statistics.median(r.wall):.2f}× |")
    out()
    for line in agree:
        out(line)
    if args.md:
        from napari_genseg.io.atomic import atomic_path

        with atomic_path(args.md) as tmp:
            with open(tmp, "w", encoding="utf-8") as f:
                f.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
