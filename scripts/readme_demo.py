"""Copy the demo's frontier plot into docs/ and its frontier table into README.md.

Run by `make readme-demo` after `make demo`; the README's demo figures are never edited
by hand. The table goes between the `<!-- demo:start -->` / `<!-- demo:end -->` markers.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
START, END = "<!-- demo:start -->", "<!-- demo:end -->"
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


def main(project: Path) -> None:
    frontier = project / "frontier"
    profile = pd.read_csv(project / "profile" / "profile.csv")
    shutil.copyfile(frontier / "frontier.png", ROOT / "docs" / "demo-frontier.png")
    table = markdown_table(profile.sort_values(["variant", "flops_fraction"]))
    readme = (ROOT / "README.md").read_text()
    head, rest = readme.split(START, 1)
    _, tail = rest.split(END, 1)
    body = (f"\n![demo frontier](docs/demo-frontier.png)\n\nEvery measured point "
            f"(`{project}/profile/profile.csv`):\n\n{table}\n")
    (ROOT / "README.md").write_text(head + START + body + END + tail)


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "demo-out"))
