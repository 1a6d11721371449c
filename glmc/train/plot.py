"""`glmc plot RUN`: loss and expert-load curves from a run's metrics.jsonl, drawn to PNG
(matplotlib, the optional `plot` extra; the Agg backend, so no display is needed)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from glmc.errors import GlmcError
from glmc.train.telemetry import METRICS_FILE


def read_metrics(run: Path) -> list[dict[str, Any]]:
    f = run / METRICS_FILE if run.is_dir() else run
    if not f.is_file():
        raise GlmcError(f"{f}: no metrics file (is {run} a `glmc train` run folder?)")
    try:
        recs = [json.loads(ln) for ln in f.read_text().splitlines() if ln.strip()]
    except json.JSONDecodeError as e:
        raise GlmcError(f"{f}: not JSON lines ({e})") from None
    if not recs:
        raise GlmcError(f"{f}: holds no steps yet")
    return recs


def plot_run(run: Path, out: Path | None = None) -> list[Path]:
    """Write loss.png and expert_load.png (into `out`, default the run folder); return the paths."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise GlmcError("glmc plot needs matplotlib: pip install 'glmc[plot]'") from None
    recs = read_metrics(run)
    out = out or (run if run.is_dir() else run.parent)
    out.mkdir(parents=True, exist_ok=True)
    steps = [r["step"] for r in recs]
    written = []

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, [r["loss"] for r in recs], label="total")
    ax.plot(steps, [r["lm_loss"] for r in recs], label="next-token CE")
    if any(r.get("mtp_loss") is not None for r in recs):
        ax.plot(steps, [r.get("mtp_loss") or float("nan") for r in recs], label="MTP CE")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(f"{run.name}: training loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    written.append(out / "loss.png")
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)

    layers = max((len(r.get("load_imbalance") or []) for r in recs), default=0)
    if layers:
        fig, ax = plt.subplots(figsize=(7, 4))
        for i in range(layers):
            ys = [
                r["load_imbalance"][i] if len(r.get("load_imbalance") or []) > i else float("nan")
                for r in recs
            ]
            ax.plot(steps, ys, label=f"MoE layer {i}", linewidth=1)
        ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
        ax.set_xlabel("step")
        ax.set_ylabel("expert load max / mean")
        ax.set_title(f"{run.name}: expert load imbalance")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        written.append(out / "expert_load.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
    return written
