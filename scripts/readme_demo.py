"""Copy the demo's frontier plot into docs/ (the README shows it) and its table of every
measured point into docs/demo.md.

Run by `make readme-demo` after `make demo`; the demo's figure and table are never edited
by hand. The table goes between the `<!-- demo:start -->` / `<!-- demo:end -->` markers
of docs/demo.md.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
START, END = "<!-- demo:start -->", "<!-- demo:end -->"
FIGURE = "demo-frontier.png"  # in docs/
COLUMNS = {"variant": "variant", "flops_fraction": "FLOPs (× dense)", "accuracy": "accuracy",
           "macro_f1": "macro-F1", "latency_ratio": "latency (× dense)",
           "mean_rank_fraction": "mean rank fraction"}


def markdown_table(frame: pd.DataFrame) -> str:
    cols = [c for c in COLUMNS if c in frame.columns]
    lines = ["| " + " | ".join(COLUMNS[c] for c in cols) + " |",
             "|" + "|".join("---" for _ in cols) + "|"]
    for _, row in frame.iterrows():
        cells = [f"{row[c]:.3f}" if isinstance(row[c], float) else str(row[c]) for c in cols]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(project: Path, root: Path = ROOT) -> None:
    frontier = project / "frontier"
    profile = pd.read_csv(project / "profile" / "profile.csv")
    shutil.copyfile(frontier / "frontier.png", root / "docs" / FIGURE)
    table = markdown_table(profile.sort_values(["variant", "flops_fraction"]))
    page = root / "docs" / "demo.md"
    head, rest = page.read_text().split(START, 1)
    _, tail = rest.split(END, 1)
    body = (f"\n![demo frontier]({FIGURE})\n\nEvery measured point "
            f"(`{project}/profile/profile.csv`):\n\n{table}\n")
    page.write_text(head + START + body + END + tail)


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "demo-out"))
