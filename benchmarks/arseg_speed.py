"""AR-Seg inference speed per slice on this machine: engine path vs an official-style loop.

Engine path (what ``ArSegPredictor`` does): embed the slice once, run the adapter once, draw all N
samples as one batch with a KV cache (prefix once on the image row, then only each new scale's
tokens), decode the N masks as a batch.

Official-style loop (the released code's structure): for each of the N samples, recompute the image
embedding, and at every scale recompute the adapter and re-run the transformer over the whole prefix
(conditioning tokens + all earlier scales) with no cache; decode each sample on its own.

Also shown: the engine path without the KV cache (batched, adapter once, prefix re-run), to isolate
the cache's share of the gain. Weights are random (timing only). Prints a table, asserts nothing.

    PYTHONPATH=src .venv/bin/python benchmarks/arseg_speed.py [--quick] [--threads 1]
        [--configs arseg_light arseg_paper] [--samples 1 16]
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from napari_genseg.models import registry
from napari_genseg.models.arseg import DEFAULT_TEMPERATURES, sample_tokens
from napari_genseg.models.arseg.sampling import draw_tokens


def _timeit(fn, reps: int, warmup: bool = True) -> float:
    """Best wall time of ``reps`` calls (after one warm-up call): the least disturbed by other
    processes on a shared machine."""
    if warmup:
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


@torch.inference_mode()
def official_style_sample(model, x, class_ids, generator) -> torch.Tensor:
    """One sample the way the released code computes it (embedding, adapter, full prefix each step).

    Returns the decoded logits [1, 1, S, S].
    """
    seg, q = model.segmentor, model.vq.quantizer
    emb = model.embed(x)  # recomputed for every sample
    side = q.latent_size
    f_hat = emb.new_zeros(1, q.dim, side, side)
    inputs = []
    for si, _pn in enumerate(q.patch_nums):
        cond, cls = seg.condition(emb, class_ids)  # adapter recomputed every scale
        prev = torch.cat(inputs, 1) if inputs else None
        logits = seg.forward_tokens(cond, cls, prev)[:, q.offsets[si]:]  # whole prefix re-run
        idx = draw_tokens(logits, DEFAULT_TEMPERATURES[si], 100, generator)
        f_hat = f_hat + q.scale_vectors(si, idx)
        if si < len(q.patch_nums) - 1:
            inputs.append(q.next_input(si, f_hat))
    return model.vq.decode_fhat(f_hat)


def bench_config(name: str, ns: list[int], reps: int, official_max: int) -> list[dict]:
    torch.manual_seed(0)
    model = registry.create_model(name).eval()
    cfg = model.cfg
    x = torch.rand(1, cfg.in_chans, cfg.img_size, cfg.img_size)
    cls = torch.zeros(1, dtype=torch.long)
    gen = torch.Generator().manual_seed(0)
    rows = []
    with torch.inference_mode():
        big = cfg.encoder_kind == "sam_vit_b"
        t_embed = _timeit(lambda: model.embed(x), 2 if big else reps, warmup=not big)
        emb = model.embed(x)
        for n in ns:
            def engine(cache=True):
                _, f_hat = sample_tokens(model.segmentor, model.vq, emb, cls, n, gen,
                                         use_kv_cache=cache)
                return f_hat

            t_sample = _timeit(lambda: engine(True), reps)
            t_nocache = _timeit(lambda: engine(False), reps)
            f_hat = engine(True)
            t_decode = _timeit(lambda: model.vq.decode_fhat(f_hat), reps)
            # official-style: N independent, identical-cost samples -> N x (best single sample
            # over min(N, official_max) timed samples)
            k = min(n, official_max)
            t_one = _timeit(lambda: official_style_sample(model, x, cls, gen), k, warmup=False)
            t_official = t_one * n
            engine_total = t_embed + t_sample + t_decode
            rows.append({
                "config": name, "N": n, "embed": t_embed, "sample": t_sample,
                "sample_nocache": t_nocache, "decode": t_decode, "engine": engine_total,
                "official": t_official, "official_est": k < n,
                "ratio": t_official / engine_total,
            })
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer repetitions, extrapolated loops")
    ap.add_argument("--configs", nargs="+", default=["arseg_light", "arseg_paper"])
    ap.add_argument("--samples", nargs="+", type=int, default=[1, 16])
    ap.add_argument("--threads", type=int, default=None,
                    help="torch intra-op threads (default: torch's choice)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    reps = 2 if args.quick else 5
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"load average {os.getloadavg()[0]:.1f} (timings are per slice, seconds)")
    rows = []
    for name in args.configs:
        # each official-style sample re-embeds (SAM: ~20 s on 2 cores): time a few, scale by N
        official_max = (1 if args.quick else 2) if name == "arseg_paper" else (4 if args.quick else 16)
        rows += bench_config(name, args.samples, reps, official_max)
    head = (f"{'config':<12} {'N':>3} {'embed':>8} {'sample':>8} {'(no KV)':>8} {'decode':>8} "
            f"{'engine':>8} {'official':>10} {'ratio':>7}")
    print(head)
    print("-" * len(head))
    for r in rows:
        off = f"{r['official']:.3f}{'*' if r['official_est'] else ' '}"
        print(f"{r['config']:<12} {r['N']:>3} {r['embed']:>8.3f} {r['sample']:>8.3f} "
              f"{r['sample_nocache']:>8.3f} {r['decode']:>8.3f} {r['engine']:>8.3f} "
              f"{off:>10} {r['ratio']:>6.1f}x")
    print("engine = embed + sample (batched, KV cache) + decode; (no KV) = batched sampling "
          "without cache;\nofficial = N x the best single per-sample loop (embedding, adapter and "
          "prefix recomputed,\nown decode); * = fewer than N samples timed. Times are the best of "
          "the repetitions.")


if __name__ == "__main__":
    main()
