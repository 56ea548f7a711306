"""Wall time and peak memory of `nsn convert` on a GPT-2-small-shaped model (124M), or a
Llama-3.2-1B-shaped one (1.24B, `--model llama-1b`, saved in bf16 like the real one).

A randomly initialised GPT-2 small (or another shape, `--model`) is saved with
`save_pretrained` (in `--source-dtype`: float32, or bfloat16 for llama-1b), with a small
BPE tokenizer, to a temporary directory. Each run then converts it in a fresh Python
process that calls `nsn_cli.stages.convert.convert`, the function behind `nsn convert`
(with `--calib`: activation-aware, on the shipped tiny text), and reports:

* end to end: the whole process, interpreter start and imports included;
* the stage, split into load (read the model), decompose (SVD of every layer) and
  save (cost probe, model.safetensors, manifest);
* peak resident memory (VmHWM) of the process, the same minus what the process held
  after its imports (torch, transformers), and the peak of its anonymous memory:
  RSS also counts the source weights, which transformers memory-maps from the
  safetensors file (clean page cache the kernel can drop), anonymous memory does not.
  Each against the size of the source's weights file. Linux only for the memory rows;
* the project's model/nsn.safetensors against the source file (the project keeps the
  source dtype by default), and how far the full-rank factors' outputs are from the
  source layers' on random inputs (relative error; bf16 rounding is 2^-8 = 0.0039).

    python benchmarks/convert.py            # 3 runs
    python benchmarks/convert.py --quick    # 1 run
    nice -n 10 python benchmarks/convert.py --model llama-1b --quick [--calib]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import shutil
import tempfile
import time
from pathlib import Path

from common import Spread, build_model, print_table

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
options = json.loads(sys.argv[3])
threads = options.pop("threads", None)
if threads:
    torch.set_num_threads(int(threads))
convert(ConvertConfig(model=sys.argv[1], out_dir=sys.argv[2], **options), on_start=on_start,
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
    parser.add_argument("--model", default="gpt2",
                        help="gpt2 (default), bert, llama (~100M) or llama-1b shape")
    parser.add_argument("--source-dtype", choices=("float32", "bfloat16"), default=None,
                        help="dtype the source is saved in (default: bfloat16 for llama-1b, "
                             "else float32)")
    parser.add_argument("--dtype", default="auto", help="nsn convert --dtype (default auto)")
    parser.add_argument("--calib", action="store_true",
                        help="activation-aware: --calib on the shipped tiny text")
    parser.add_argument("--calib-samples", type=int, default=16)
    parser.add_argument("--calib-seq-len", type=int, default=64)
    parser.add_argument("--allocation", default="auto", help="nsn convert --allocation")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads in the converting process (default: torch's)")
    parser.add_argument("--repeats", type=int, default=None, help="conversions (default 3)")
    parser.add_argument("--quick", action="store_true", help="one conversion")
    return parser.parse_args()


def save_source(family: str, dtype: str, dest: Path) -> int:
    """Save the model and a small tokenizer; returns the size of its weights file."""
    import gc

    import torch

    sys.path.insert(0, str(ROOT))
    from tests.helpers import make_tokenizer  # the test suite's tiny BPE tokenizer

    model = build_model(family, dtype=getattr(torch, dtype))
    model.save_pretrained(dest)
    make_tokenizer().save_pretrained(dest)
    del model
    gc.collect()
    return sum(f.stat().st_size for f in dest.glob("*.safetensors"))


# How far the project's full-rank layers are from the source's: random inputs through
# W (from the source file) and B A (from the project), in float32. Reads tensors lazily,
# so it never holds either model whole.
FIDELITY = r"""
import json, sys, torch
from safetensors import safe_open
source, project, manifest = sys.argv[1], sys.argv[2], json.load(open(sys.argv[3]))
specs = manifest["modules"]
pick = [s for s in specs if ".0." in s["name"]] + specs[-7:]
worst, gen = 0.0, torch.Generator().manual_seed(0)
with safe_open(source, "pt") as src, safe_open(project, "pt") as prj:
    for spec in pick:
        W = src.get_tensor(spec["name"] + ".weight").float()
        if spec["kind"] == "conv1d":
            W = W.T
        A, B = (prj.get_tensor(f"{spec['name']}.{k}").float() for k in "AB")
        x = torch.randn(64, spec["d_in"], generator=gen)
        ref = x @ W.T
        err = float((x @ A.T @ B.T - ref).norm() / ref.norm())
        worst = max(worst, err)
print(json.dumps({"layers": len(pick), "worst": worst}))
"""


def fidelity(source: Path, project: Path) -> dict:
    files = sorted(source.glob("*.safetensors"))
    proc = subprocess.run([sys.executable, "-c", FIDELITY, str(files[0]),
                           str(project / "model" / "nsn.safetensors"),
                           str(project / "nsn.json")], capture_output=True, text=True,
                          cwd=ROOT, env={**CHILD_ENV, "PYTHONPATH": str(ROOT)})
    if proc.returncode != 0:
        raise SystemExit(f"fidelity check failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_once(source: Path, work: Path, index: int, options: dict) -> dict:
    out = work / f"project-{index}"
    cmd = [sys.executable, "-c", CHILD, str(source), str(out), json.dumps(options)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT,
                          env={**CHILD_ENV, "PYTHONPATH": str(ROOT)})
    total = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"convert failed:\n{proc.stderr[-2000:]}")
    marks = json.loads(proc.stdout.strip().splitlines()[-1])
    marks["process"] = total
    marks["project_bytes"] = (out / "model" / "nsn.safetensors").stat().st_size
    marks["fidelity"] = fidelity(source, out)
    shutil.rmtree(out)  # a 1B project is gigabytes: one on disk at a time
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
        ["source weights file", f"{size / mib:.0f}", "", "MiB"],
        ["project model/nsn.safetensors", f"{runs[0]['project_bytes'] / mib:.0f}", "", "MiB"],
        ["project / source file", f"{runs[0]['project_bytes'] / size:.2f}", "", "x"],
        ["full-rank output error, worst of "
         f"{runs[0]['fidelity']['layers']} layers", f"{max(r['fidelity']['worst'] for r in runs):.4f}",
         "", "rel"],
        ["peak RSS", *_mem(peak), "MiB"],
        ["  RSS after imports", *_mem(base), "MiB"],
        ["  peak anonymous (not file-backed)", *_mem(anon), "MiB"],
        ["peak RSS / source file", f"{max(peak) * mib / size:.2f}", "", "x"],
        ["(peak RSS - imports) / source file",
         f"{max(p - b for p, b in zip(peak, base)) * mib / size:.2f}", "", "x"],
        ["peak anonymous / source file", f"{max(anon) * mib / size:.2f}", "", "x"],
    ]
    print_table(["", "median", "min-max", "unit"], rows)


def _mem(values):
    s = Spread.of(values)
    return f"{s.median:.0f}", f"{s.min:.0f}-{s.max:.0f}"


def main():
    args = parse_args()
    runs = args.repeats or (1 if args.quick else 3)
    source_dtype = args.source_dtype or ("bfloat16" if args.model == "llama-1b" else "float32")
    options = {"dtype": args.dtype, "allocation": args.allocation, "threads": args.threads}
    if args.calib:
        options.update(calib=str(ROOT / "tests" / "data" / "tiny.txt"),
                       calib_samples=args.calib_samples, calib_seq_len=args.calib_seq_len)
    with tempfile.TemporaryDirectory(prefix="nsn-bench-convert-") as tmp:
        work = Path(tmp)
        size = save_source(args.model, source_dtype, work / "source")
        print(f"{args.model}: {source_dtype} source of {size / 2**20:.0f} MiB; convert "
              f"{json.dumps({k: v for k, v in options.items() if v is not None})}; "
              f"{runs} conversion(s)", flush=True)
        before = os.getloadavg()[0]
        results = [run_once(work / "source", work, i, options) for i in range(runs)]
    report(results, size, (before, os.getloadavg()[0]))


if __name__ == "__main__":
    main()
