"""The frontier plot: metric and measured latency against FLOPs, headless (Agg).

Built on matplotlib's object API (Figure + FigureCanvasAgg), never pyplot, so it needs
no display and keeps no global state. `plot_frontier` returns the Figure, so tests can
read back the exact data that was drawn.
"""

from __future__ import annotations

import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from nsn_cli.text import human  # noqa: E402

METRIC_LABELS = {
    "perplexity": "perplexity (exp of mean NLL per token; lower is better)",
    "nll": "mean NLL per token (nats; lower is better)",
    "accuracy": "accuracy (fraction correct; higher is better)",
    "macro_f1": "macro-F1 (higher is better)",
}
COLORS = {"nsn": "#1f77b4", "baseline": "#d62728", "dense": "black", "ladder": "#2ca02c"}
FORMATS = ("png", "svg")


def plot_frontier(profile, front, metric: str, higher_is_better: bool, info: dict | None = None,
                  manifest: dict | None = None) -> Figure:
    """Top: metric vs FLOPs fraction; bottom: measured latency ratio vs FLOPs fraction.

    Lines carry gids ('nsn-measured', 'nsn-frontier', 'baseline-measured',
    'baseline-frontier', 'dense', 'nsn-latency', 'dense-latency', 'ladder') so the
    drawn data can be checked against the CSVs.
    """
    info, manifest = info or {}, manifest or {}
    run = info.get("run", {})
    figure = Figure(figsize=(7.5, 8), layout="constrained")
    FigureCanvasAgg(figure)
    top, bottom = figure.subplots(2, 1, sharex=True, height_ratios=[3, 2])
    draw_metric(top, profile, front, metric)
    draw_latency(bottom, profile)
    for fraction in [p["flops_fraction"] for p in info.get("ladder", [])]:
        for axis in (top, bottom):
            axis.axvline(fraction, color=COLORS["ladder"], linestyle=":", linewidth=1,
                         gid="ladder", label="trained ladder rank" if axis is top and
                         fraction == info["ladder"][0]["flops_fraction"] else None)
    dense_flops = run.get("dense_flops_per_token")
    seq = f" at seq_len {run['seq_len']}" if run.get("seq_len") else ""
    bottom.set_xlabel("FLOPs per token, fraction of the dense original"
                      + (f" (dense = {human(dense_flops)} FLOPs/token{seq})" if dense_flops else ""))
    top.set_ylabel(METRIC_LABELS.get(metric, metric))
    latency = run.get("dense_latency_ms")
    batch = (f"{run['batch_size']}×{run['seq_len']} tokens" if run.get("batch_size") else "a batch")
    bottom.set_ylabel("latency per batch, × dense"
                      + (f"\n(dense = {latency:.3g} ms for {batch}, {run.get('device', '')})"
                         if latency else ""))
    source = (manifest.get("source") or {}).get("id", "")
    top.set_title(f"nsn frontier{': ' + source if source else ''}")
    top.legend(loc="best", fontsize="small")
    bottom.legend(loc="upper left", fontsize="small")
    for axis in (top, bottom):
        axis.grid(True, alpha=0.3)
    bottom.set_xlim(0, 1.05)
    return figure


def draw_metric(axis, profile, front, metric: str) -> None:
    """Each variant: every measured point (thin), its Pareto frontier (bold) on top."""
    styles = {"nsn": ("-", "o", "nsn"), "baseline": ("--", "s", "plain truncated SVD (--baseline)")}
    for variant, (line, marker, name) in styles.items():
        measured = profile[profile["variant"] == variant].sort_values("flops_fraction")
        if measured.empty:
            continue
        axis.plot(measured["flops_fraction"], measured[metric], line, marker=marker,
                  color=COLORS[variant], alpha=0.35, markersize=4, linewidth=1,
                  gid=f"{variant}-measured", label=f"{name}, every measured setting")
        part = front[front["variant"] == variant]
        axis.plot(part["flops_fraction"], part[metric], line, marker=marker,
                  color=COLORS[variant], linewidth=2, gid=f"{variant}-frontier",
                  label=f"{name}, Pareto frontier")
    dense = profile[profile["variant"] == "dense"]
    if not dense.empty:
        axis.plot(dense["flops_fraction"], dense[metric], "*", color=COLORS["dense"],
                  markersize=14, gid="dense", label="dense original (full rank, merged)")
    values = profile[metric].dropna()
    if metric == "perplexity" and len(values) and values.min() > 0 and \
            values.max() / values.min() > 20:
        axis.set_yscale("log")  # collapsed low ranks would flatten everything else


def draw_latency(axis, profile) -> None:
    # The baseline runs the same layers at the same ranks, so only nsn is drawn here.
    nsn = profile[profile["variant"] == "nsn"].sort_values("flops_fraction")
    axis.plot(nsn["flops_fraction"], nsn["latency_ratio"], "-o", color=COLORS["nsn"],
              gid="nsn-latency", label="nsn, measured (median)")
    axis.plot([0, 1], [0, 1], "--", color="grey", linewidth=1, label="latency ∝ FLOPs")
    dense = profile[profile["variant"] == "dense"]
    if not dense.empty:
        axis.plot(dense["flops_fraction"], dense["latency_ratio"], "*", color=COLORS["dense"],
                  markersize=14, gid="dense-latency")
    axis.set_ylim(bottom=0)


def save_figure(figure: Figure, folder: Path, stem: str = "frontier") -> list[Path]:
    """Write STEM.png and STEM.svg atomically; return their paths."""
    from nsn_cli.project.files import atomic_write_bytes

    paths = []
    for fmt in FORMATS:
        buffer = io.BytesIO()
        figure.savefig(buffer, format=fmt, dpi=150)
        path = Path(folder) / f"{stem}.{fmt}"
        atomic_write_bytes(path, buffer.getvalue())
        paths.append(path)
    return paths
