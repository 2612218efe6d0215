"""Peak memory (RSS) of ``genseg segment`` per stage on a synthetic full-size CT.

    PYTHONPATH=src OMP_NUM_THREADS=1 .venv/bin/python benchmarks/memory.py [--slices-count 300]
        [--model msa2net] [--threads 1] [--backend auto] [--batch-size 4] [--keep] [--ct FILE]

A synthetic 512x512xN int16 CT (air outside an elliptic body of soft tissue with lungs, a liver,
kidneys, spine; N = ``--slices-count``, 300 by default = 150 MB) is written as NIfTI (.nii.gz) to
a temporary folder, then ``napari_genseg.cli.main(["segment", ...])`` runs in this process (the
CLI's own code path, default model and options). Stages are marked by wrapping the functions the
CLI calls: read (``cli._load``), model (``cli._resolve``), checks (``cli._checked``), predictor
(``predictors.make_predictor``: an ONNX export with ``--backend auto``), infer (iterating
``engine.run_volume``), postprocess (``postprocessing.postprocess``), write (``cli._write_result``).

How peaks are measured: the kernel's own peak RSS (``VmHWM`` in /proc/self/status) is reset at the
start of every stage by writing "5" to /proc/self/clear_refs (Linux >= 4.0) and read at its end,
so a stage's peak is exact (no sampling gaps). Where the reset is refused, a sampling thread
reading /proc/self/statm every 2 ms gives the peak instead (the table says which). The baseline
is the RSS after the imports (torch, the package, nibabel, scipy, onnxruntime when present) and,
unless ``--no-warmup``, a first CLI run on a 4-slice CT (it pulls in the lazy imports: timm when
the model is built, the ONNX exporter and ONNX Runtime with ``--backend auto``; then
``malloc_trim``), taken before the measured volume is read. Reported: peak above the baseline per stage, the volume's bytes, the
model's bytes (parameters + buffers), the infer stage's time split into preprocess (the
predictor's ``set_image``), the model ``forward`` and the rest of ``predict`` (back to the slice
grid, arg-max), what each stage added above the RSS at its start ("stage
own": freed memory the allocator keeps from earlier stages hides part of a later stage's own
peak), each stage's wall time (the end-to-end time is the "wall" line) and the ratio (highest peak above baseline) / (volume bytes +
model bytes); the bound of issue #12 is 3.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

PAGE = os.sysconf("SC_PAGE_SIZE")
MB = 1024 * 1024


def synthetic_ct(n: int, size: int = 512, seed: int = 0) -> np.ndarray:
    """(n, size, size) int16 HU, display order (z, y, x): air, body, lungs, liver, kidneys, spine."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    out = np.empty((n, size, size), np.int16)
    for z in range(n):
        t = z / max(n - 1, 1)
        s = np.full((size, size), -1000.0, np.float32)
        body = ((yy - 0.5) / 0.33) ** 2 + ((xx - 0.5) / 0.42) ** 2 < 1
        s[body] = 40.0
        if t > 0.55:  # thorax: lungs
            for cx in (0.33, 0.67):
                s[((yy - 0.45) / 0.2) ** 2 + ((xx - cx) / 0.12) ** 2 < 1] = -850.0
        else:  # abdomen: liver (patient's right = image left), kidneys
            s[((yy - 0.45) / 0.15) ** 2 + ((xx - 0.35) / 0.14) ** 2 < 1] = 60.0
            for cx in (0.38, 0.62):
                s[((yy - 0.62) / 0.05) ** 2 + ((xx - cx) / 0.035) ** 2 < 1] = 150.0
        s[((yy - 0.72) / 0.04) ** 2 + ((xx - 0.5) / 0.04) ** 2 < 1] = 700.0  # spine
        s += rng.normal(0, 12, s.shape).astype(np.float32)
        out[z] = np.clip(s, -1024, 3071)
    return out


def write_nifti(path: Path, data_zyx: np.ndarray, spacing=(1.5, 0.8, 0.8)) -> None:
    import nibabel as nib

    sz, sy, sx = spacing
    aff = np.diag([-sx, -sy, sz, 1.0])  # LPS display axes as RAS: x toward L, y toward P, z up
    img = nib.Nifti1Image(np.ascontiguousarray(np.transpose(data_zyx, (2, 1, 0))), aff)
    img.set_qform(aff, 1)
    img.set_sform(aff, 1)
    nib.save(img, str(path))


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def _hwm() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise OSError("no VmHWM")


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class StageMeter:
    """Peak RSS per named stage: exact (VmHWM reset) where the kernel allows, else sampled."""

    def __init__(self, interval: float = 0.002):
        self.exact = _reset_hwm()
        self.peaks: dict[str, int] = {}
        self.starts: dict[str, int] = {}  # RSS when the stage began (its first call)
        self.order: list[str] = []
        self.seconds: dict[str, float] = {}  # wall time per stage (summed over its calls)
        self._stage: str | None = None
        self._sampled = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, args=(interval,), daemon=True)
        self._thread.start()

    def _sample(self, interval: float) -> None:
        while not self._stop.is_set():
            self._sampled = max(self._sampled, _rss())
            time.sleep(interval)

    @contextlib.contextmanager
    def stage(self, name: str):
        if self._stage is not None:  # nested call (e.g. _load inside another stage): counts there
            yield
            return
        self._stage = name
        if self.exact:
            _reset_hwm()
        self._sampled = _rss()
        self.starts.setdefault(name, self._sampled)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0
            self._sampled = max(self._sampled, _rss())
            peak = _hwm() if self.exact else self._sampled
            if name not in self.peaks:
                self.order.append(name)
            self.peaks[name] = max(self.peaks.get(name, 0), peak)
            self._stage = None

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


def _wrap(meter: StageMeter, name: str, fn):
    @functools.wraps(fn)
    def inner(*a, **k):
        with meter.stage(name):
            return fn(*a, **k)

    return inner


def _wrap_gen(meter: StageMeter, name: str, fn):
    @functools.wraps(fn)
    def inner(*a, **k):
        gen = fn(*a, **k)
        with meter.stage(name):
            result = yield from gen
        return result

    return inner


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slices-count", type=int, default=300)
    ap.add_argument("--model", default="msa2net")
    ap.add_argument("--threads", default="1", help="passed to genseg segment; 'auto' = the CLI's default "
                                                   "(no --threads: README 'Threads')")
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder (prints it)")
    ap.add_argument("--ct", default=None, help="a synthetic CT this script wrote before (--keep): reused "
                                               "instead of writing a new one (--slices-count is ignored)")
    ap.add_argument("--no-warmup", dest="warmup", action="store_false",
                    help="skip the warm-up run on a 4-slice CT (it loads the lazy imports: timm, the "
                         "ONNX exporter, ONNX Runtime's session code) before the baseline is taken")
    args = ap.parse_args(argv)

    tmp = Path(tempfile.mkdtemp(prefix="genseg-mem-"))
    ct = tmp / "ct.nii.gz"
    small = tmp / "warmup.nii.gz"
    write_nifti(small, synthetic_ct(4))
    if args.ct:
        import nibabel as nib

        ct = Path(args.ct)
        hdr = nib.load(str(ct)).header
        args.slices_count = int(hdr.get_data_shape()[2])
        vol_bytes = int(np.prod(hdr.get_data_shape())) * np.dtype(hdr.get_data_dtype()).itemsize
    else:
        data = synthetic_ct(args.slices_count)
        vol_bytes = data.nbytes
        write_nifti(ct, data)
        del data
    gc.collect()

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import nibabel  # noqa: F401
    import scipy.ndimage  # noqa: F401
    import torch  # noqa: F401

    import napari_genseg.cli as cli
    import napari_genseg.engine as engine
    import napari_genseg.postprocessing as post
    import napari_genseg.predictors as predictors
    from napari_genseg.models import registry  # noqa: F401

    with contextlib.suppress(ImportError):
        import onnxruntime  # noqa: F401
    cli_args = ["--model", args.model, "--backend", args.backend, "--batch-size", str(args.batch_size), "--quiet"]
    if args.threads != "auto":
        cli_args += ["--threads", str(args.threads)]
    if args.warmup:
        import io

        with contextlib.redirect_stderr(io.StringIO()):
            cli.main(["segment", str(small), "--out", str(tmp / "warmup_mask.nii.gz"), *cli_args])
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)  # give freed heap back: the baseline is what is in use
    base = _rss()
    meter = StageMeter()
    model_bytes = {}

    def resolve(*a, **k):
        ckpt = cli_resolve(*a, **k)
        m = ckpt.model
        model_bytes["n"] = sum(t.numel() * t.element_size() for t in [*m.parameters(), *m.buffers()])
        return ckpt

    cli_resolve = cli._resolve
    parts = {"preprocess": 0.0, "forward": 0.0, "to grid + arg-max": 0.0}

    def timed(name, fn):
        @functools.wraps(fn)
        def inner(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                parts[name] += time.perf_counter() - t

        return inner

    def make_predictor(*a, **k):  # the infer stage split: set_image / forward / the rest of predict
        pred = predictors_make(*a, **k)
        if hasattr(pred, "forward"):
            pred.set_image = timed("preprocess", pred.set_image)
            pred.forward = timed("forward", pred.forward)
            pred.predict = timed("to grid + arg-max", pred.predict)  # includes forward: subtracted below
        return pred

    predictors_make = predictors.make_predictor
    cli._load = _wrap(meter, "read", cli._load)
    cli._resolve = _wrap(meter, "model", resolve)
    cli._checked = _wrap(meter, "checks", cli._checked)
    cli._write_result = _wrap(meter, "write", cli._write_result)
    predictors.make_predictor = _wrap(meter, "predictor", make_predictor)
    engine.run_volume = _wrap_gen(meter, "infer", engine.run_volume)
    post.postprocess = _wrap(meter, "postprocess", post.postprocess)

    out = tmp / "mask.nii.gz"
    t0 = time.perf_counter()
    rc = cli.main(["segment", str(ct), "--out", str(out), *cli_args])
    wall = time.perf_counter() - t0
    meter.close()
    if rc != 0:
        print(f"genseg segment failed (exit {rc})", file=sys.stderr)
        return rc

    mb = model_bytes.get("n", 0)
    denom = vol_bytes + mb
    how = "VmHWM reset per stage (exact)" if meter.exact else "sampled /proc/self/statm every 2 ms"
    print(f"synthetic CT 512x512x{args.slices_count} int16: {vol_bytes / MB:.1f} MiB; model {args.model} "
          f"{mb / MB:.1f} MiB; threads {args.threads} (ran {torch.get_num_threads()}); backend {args.backend}; batch {args.batch_size}; "
          f"wall {wall:.1f} s; load average {os.getloadavg()[0]:.1f}")
    print(f"baseline RSS after imports{' and a 4-slice warm-up run' if args.warmup else ''} {base / MB:.0f} MiB; "
          f"peaks: {how}")
    print(f"{'stage':<12} {'peak MiB':>9} {'above base MiB':>15} {'x (vol+model)':>14} {'stage own MiB':>14} "
          f"{'seconds':>8}")
    worst = 0
    for name in meter.order:
        above = meter.peaks[name] - base
        own = meter.peaks[name] - meter.starts[name]  # what the stage added above its start RSS
        worst = max(worst, above)
        print(f"{name:<12} {meter.peaks[name] / MB:>9.0f} {above / MB:>15.0f} {above / denom:>14.2f} "
              f"{own / MB:>14.0f} {meter.seconds[name]:>8.1f}")
    if parts["forward"]:
        parts["to grid + arg-max"] -= parts["forward"]
        rest = meter.seconds.get("infer", 0.0) - sum(parts.values())
        print("infer split: " + ", ".join(f"{k} {v:.1f} s" for k, v in parts.items()) + f", engine rest {rest:.1f} s")
    ratio = worst / denom
    print(f"peak above imports {worst / MB:.0f} MiB = {ratio:.2f} x (volume + model); bound 3: "
          f"{'OK' if ratio < 3 else 'EXCEEDED'}; (peak - model) / volume = {(worst - mb) / vol_bytes:.2f}")
    if args.keep:
        print(f"kept {tmp}")
    else:
        for p in tmp.iterdir():  # never the --ct file: it lies elsewhere
            p.unlink()
        tmp.rmdir()
    return 0


if __name__ == "__main__":
    sys.exit(main())
