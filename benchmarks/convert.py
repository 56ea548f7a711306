"""Wall time and peak memory of `nsn convert` on a GPT-2-small-shaped model (124M).

A randomly initialised GPT-2 small (or another shape, `--model`) is saved with
`save_pretrained`, with a small BPE tokenizer, to a temporary directory. Each run then
converts it in a fresh Python process that calls `nsn_cli.convert.convert`, the
function behind `nsn convert`, and reports:

* end to end: the whole process, interpreter start and imports included;
* the stage, split into load (read the model), decompose (SVD of every layer) and
  save (cost probe, model.safetensors, manifest);
* peak resident memory (VmHWM) of the process, the same minus what the process held
  after its imports (torch, transformers), and the peak of its anonymous memory:
  RSS also counts the source weights, which transformers memory-maps from the
  safetensors file (clean page cache the kernel can drop), anonymous memory does not.
  Each against the fp32 size of the model. Linux only for the memory rows.

    python benchmarks/convert.py            # 3 runs
    python benchmarks/convert.py --quick    # 1 run
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import Spread, build_model, param_bytes, print_table

ROOT = Path(__file__).resolve().parents[1]
# The environment the converting process gets, taken before anything here can change it:
# importing the test suite's conftest (for its tokenizer) pins OMP_NUM_THREADS=1.
CHILD_ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}

# The child: the convert stage exactly as `nsn convert` runs it, with timestamps.
CHILD = r"""
import json, resource, sys, time
start = time.perf_counter()
from nsn_cli.stages.config import ConvertConfig
from nsn_cli.stages.convert import convert
import torch, transformers
marks = {"imports": time.perf_counter()}
def peak_kib():
    # VmHWM: this process image's own peak. ru_maxrss would carry over the parent's
    # peak across fork + exec on Linux; it is the fallback elsewhere (bytes on macOS).
    try:
        with open("/proc/self/status") as status:
            return next(int(l.split()[1]) for l in status if l.startswith("VmHWM:"))
    except OSError:
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return rss / 1024 if sys.platform == "darwin" else rss
marks["rss_after_imports"] = peak_kib()
anon = {"peak": 0}
def watch_anonymous():
    # Anonymous memory is what the process cannot hand back; RSS also counts the
    # source weights, which transformers memory-maps from disk (page cache).
    while True:
        try:
            with open("/proc/self/status") as status:
                now = next(int(l.split()[1]) for l in status if l.startswith("RssAnon:"))
        except (OSError, StopIteration):
            return
        anon["peak"] = max(anon["peak"], now)
        time.sleep(0.01)
import threading
threading.Thread(target=watch_anonymous, daemon=True).start()
def on_start(n):
    marks["loaded"] = time.perf_counter()
def on_layer(spec):
    marks["decomposed"] = time.perf_counter()
if len(sys.argv) > 3:
    torch.set_num_threads(int(sys.argv[3]))
convert(ConvertConfig(model=sys.argv[1], out_dir=sys.argv[2]), on_start=on_start,
        on_layer=on_layer)
marks["saved"] = time.perf_counter()
usage = resource.getrusage(resource.RUSAGE_SELF)
marks["cpu"] = usage.ru_utime + usage.ru_stime  # every thread of the process
marks["peak_rss"] = peak_kib()
marks["peak_anon"] = anon["peak"]
marks = {k: (v - start if k in ("imports", "loaded", "decomposed", "saved") else v)
         for k, v in marks.items()}
print(json.dumps(marks))
"""


def parse_args():
    # nsn convert runs on CPU and is timed by the wall clock: no --device, no --clock.
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="gpt2", help="gpt2 (default), bert or llama shape")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads in the converting process (default: torch's)")
    parser.add_argument("--repeats", type=int, default=None, help="conversions (default 3)")
    parser.add_argument("--quick", action="store_true", help="one conversion")
    return parser.parse_args()


def save_source(family: str, dest: Path) -> int:
    """Save the model and a small tokenizer; returns the model's fp32 size in bytes."""
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import make_tokenizer  # the test suite's tiny BPE tokenizer

    model = build_model(family)
    size = param_bytes(model)
    model.save_pretrained(dest)
    make_tokenizer().save_pretrained(dest)
    return size


def run_once(source: Path, work: Path, index: int, threads: int | None) -> dict:
    out = work / f"project-{index}"
    cmd = [sys.executable, "-c", CHILD, str(source), str(out)]
    if threads:
        cmd.append(str(threads))
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT,
                          env={**CHILD_ENV, "PYTHONPATH": str(ROOT)})
    total = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"convert failed:\n{proc.stderr[-2000:]}")
    marks = json.loads(proc.stdout.strip().splitlines()[-1])
    marks["process"] = total
    return marks


def report(runs: list[dict], size: int, load: tuple[float, float]) -> None:
    def spread(values):
        s = Spread.of(values)
        return f"{s.median:.1f}", f"{s.min:.1f}-{s.max:.1f}"

    rows = [
        ["end to end (process)", *spread([r["process"] for r in runs]), "s"],
        ["  interpreter + imports", *spread([r["imports"] for r in runs]), "s"],
        ["  load", *spread([r["loaded"] - r["imports"] for r in runs]), "s"],
        ["  decompose", *spread([r["decomposed"] - r["loaded"] for r in runs]), "s"],
        ["  probe + save", *spread([r["saved"] - r["decomposed"] for r in runs]), "s"],
        ["stage (load + decompose + save)", *spread([r["saved"] - r["imports"] for r in runs]),
         "s"],
        ["CPU time of the process (all threads)", *spread([r["cpu"] for r in runs]), "s"],
        ["machine load average before / after", f"{load[0]:.1f} / {load[1]:.1f}", "", ""],
    ]
    mib = 1024 * 1024
    peak = [r["peak_rss"] * 1024 / mib for r in runs]
    base = [r["rss_after_imports"] * 1024 / mib for r in runs]
    anon = [r["peak_anon"] * 1024 / mib for r in runs]
    rows += [
        ["fp32 model size", f"{size / mib:.0f}", "", "MiB"],
        ["peak RSS", *_mem(peak), "MiB"],
        ["  RSS after imports", *_mem(base), "MiB"],
        ["  peak anonymous (not file-backed)", *_mem(anon), "MiB"],
        ["peak RSS / model size", f"{max(peak) * mib / size:.2f}", "", "x"],
        ["(peak RSS - imports) / model size",
         f"{max(p - b for p, b in zip(peak, base)) * mib / size:.2f}", "", "x"],
        ["peak anonymous / model size", f"{max(anon) * mib / size:.2f}", "", "x"],
    ]
    print_table(["", "median", "min-max", "unit"], rows)


def _mem(values):
    s = Spread.of(values)
    return f"{s.median:.0f}", f"{s.min:.0f}-{s.max:.0f}"


def main():
    args = parse_args()
    runs = args.repeats or (1 if args.quick else 3)
    with tempfile.TemporaryDirectory(prefix="nsn-bench-convert-") as tmp:
        work = Path(tmp)
        size = save_source(args.model, work / "source")
        print(f"{args.model}: {size / 4 / 1e6:.0f}M parameters; {runs} conversion(s)", flush=True)
        before = os.getloadavg()[0]
        results = [run_once(work / "source", work, i, args.threads) for i in range(runs)]
    report(results, size, (before, os.getloadavg()[0]))


if __name__ == "__main__":
    main()
