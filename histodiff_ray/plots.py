"""Figures a person would rather look at than a CSV: training curves as small PNGs."""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")  # headless: files only
import matplotlib.pyplot as plt  # noqa: E402


def curves_png(history: list[dict], title: str, keys: list[str] | None = None) -> bytes:
    """One panel per metric (step on x), PNG bytes, ~600 px wide."""
    if keys is None:  # every numeric metric, in first-seen order (validation rows come later)
        keys = list(
            dict.fromkeys(
                k
                for row in history
                for k, v in row.items()
                if k not in ("step", "resumed_from_step", "val_tiles") and isinstance(v, (int, float))
            )
        )
    fig, axes = plt.subplots(1, len(keys), figsize=(3.0 * len(keys), 2.6), dpi=90, squeeze=False)
    for ax, key in zip(axes[0], keys):
        points = [(row["step"], row[key]) for row in history if row.get(key) is not None]
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="." if len(points) < 30 else None, lw=1.2)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()
