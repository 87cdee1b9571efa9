"""`report.html` plus the PNGs it shows, for a pipeline's outputs (local or S3).

Sections: real vs synthetic tiles per class, kept and dropped synthetic examples with the reason,
selection-score histograms, training curves, the accuracy table with 95% intervals, confusion
matrices, generation metrics and, when given, the fidelity tables of `histodiff fidelity`. The
page uses relative image paths only, so the folder can be copied anywhere (or served from S3) and
opened in a browser.
"""

from __future__ import annotations

import html
import io
import json
import math

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pyarrow.parquet as pq

from histodiff_ray.config import Config
from histodiff_ray.data.synthetic import read_tile_images
from histodiff_ray.data.tiles import decode_images, decode_png, load_tile_table, require_manifest
from histodiff_ray.fidelity import CEILING_NOTE, TABLE_HEADER, ceiling_title, table_rows
from histodiff_ray.ldm import tile_grid
from histodiff_ray.storage import exists, open_location, read_bytes, write_atomic

CSS = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222;background:#fff}
h1{font-size:1.6em}h2{margin-top:1.6em;border-bottom:1px solid #ddd}table{border-collapse:collapse;margin:1em 0}
td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}th{background:#f3f3f3}td:first-child{text-align:left}
figure{display:inline-block;margin:0 1em 1em 0;vertical-align:top}figcaption{font-size:.85em;color:#555;max-width:520px}
img{max-width:520px;image-rendering:pixelated;border:1px solid #ddd}.note{color:#555;font-size:.9em}"""


def _png(fig) -> bytes:

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _grid_png(tiles: np.ndarray, columns: int = 8) -> bytes:

    buf = io.BytesIO()
    tile_grid(tiles, columns=columns).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def _figure(src: str, caption: str) -> str:
    img = f'<img src="{html.escape(src)}" alt="{html.escape(caption)}">'
    return f"<figure>{img}<figcaption>{html.escape(caption)}</figcaption></figure>"


def build_report(
    cfg: Config,
    *,
    tiles: str,
    output: str,
    synthetic: str | None = None,
    evaluation: str | None = None,
    runs: dict[str, str] | None = None,
    title: str = "histodiff_ray report",
    notes: list[str] | None = None,
    fidelity: str | None = None,
) -> str:
    """Write OUTPUT/report.html and OUTPUT/img/*.png; returns the report's URI. ``evaluation`` and
    ``fidelity`` are the output folders of `histodiff evaluate` / `histodiff fidelity`."""

    matplotlib.use("Agg")

    out = open_location(output, cfg.storage)
    tiles_loc = open_location(tiles, cfg.storage)
    classes = require_manifest(tiles_loc)["classes"]
    parts = [f"<h1>{html.escape(title)}</h1>"]
    parts += [f'<p class="note">{html.escape(n)}</p>' for n in notes or []]

    def put(name: str, data: bytes) -> str:
        write_atomic(out.join("img", name), data)
        return f"img/{name}"

    # Real vs synthetic, per class.
    real = load_tile_table(tiles_loc, "train", labeled_only=True)
    real_labels = real.column("label").to_numpy()
    index = None
    if synthetic:
        syn = open_location(synthetic, cfg.storage)
        index = pq.read_table(io.BytesIO(read_bytes(syn.join("index.parquet"))))
    parts.append("<h2>Real and synthetic tiles per class</h2>")
    for c, name in enumerate(classes):
        mine = np.flatnonzero(real_labels == c)[:32]
        if len(mine):
            src = put(f"real-{name}.png", _grid_png(decode_images(real.column("image").take(mine))))
            parts.append(_figure(src, f"{name}: real labeled train tiles ({int((real_labels == c).sum())} in all)"))
        if index is not None:
            for kept, what in ((True, "kept"), (False, "dropped")):
                rows = _synthetic_rows(index, c, kept)[:32]
                if rows:
                    pngs = read_tile_images(syn, [r["tile_id"] for r in rows], [r["shard"] for r in rows])
                    tiles_np = np.stack([decode_png(b) for b in pngs])
                    reasons = sorted({r["reason"] for r in rows if r["reason"]})
                    caption = f"{name}: synthetic, {what}" + (f" (reasons: {', '.join(reasons)})" if reasons else "")
                    parts.append(_figure(put(f"synthetic-{name}-{what}.png", _grid_png(tiles_np)), caption))

    if index is not None:
        parts.append("<h2>Selection</h2>")
        summary = json.loads(read_bytes(syn.join("summary.json")))
        parts.append(
            "<table><tr><th>class</th><th>generated</th><th>kept</th><th>dropped (reason: count)</th></tr>"
            + "".join(
                f"<tr><td>{html.escape(n)}</td><td>{c['generated']}</td><td>{c['kept']}</td>"
                f"<td>{html.escape(', '.join(f'{r}: {k}' for r, k in c['dropped'].items()) or '-')}</td></tr>"
                for n, c in summary["per_class"].items()
            )
            + "</table>"
        )
        sel = summary["selection"]
        fig, axes = plt.subplots(1, 3, figsize=(12, 3))
        labels = index.column("label").to_numpy()
        for ax, column, threshold, xlabel in (
            (axes[0], "confidence", sel["confidence_threshold"], "judge p(target class)"),
            (axes[1], "centroid_similarity", None, "cosine similarity to the target centroid"),
            (axes[2], "real_distance", sel["min_real_distance"] or None, "RMS distance to the nearest real tile"),
        ):
            values = index.column(column).to_numpy()
            for c, name in enumerate(classes):
                ax.hist(values[labels == c], bins=20, alpha=0.5, label=name)
            if threshold is not None:
                ax.axvline(threshold, color="k", linestyle="--", linewidth=1)
            ax.set_xlabel(xlabel)
        axes[0].set_ylabel("synthetic tiles")
        axes[0].legend(fontsize=7)
        parts.append(
            _figure(put("selection-histograms.png", _png(fig)), "selection scores per class (dashed: threshold)")
        )

    if runs:
        parts.append("<h2>Training curves</h2>")
        for name, uri in runs.items():
            loc = open_location(uri, cfg.storage)
            if exists(loc.join("curves.png")):
                parts.append(_figure(put(f"curves-{name}.png", read_bytes(loc.join("curves.png"))), f"{name}: {uri}"))

    if evaluation:
        result = json.loads(read_bytes(open_location(evaluation, cfg.storage).join("evaluation.json")))
        parts.append(_evaluation_html(result, put))
    if fidelity:
        parts.append(_fidelity_html(json.loads(read_bytes(open_location(fidelity, cfg.storage).join("fidelity.json")))))
    write_atomic(
        out.join("report.html"),
        (
            f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{CSS}</style></head><body>{''.join(parts)}</body></html>"
        ).encode(),
    )
    return out.join("report.html").uri


def _synthetic_rows(index, label: int, kept: bool) -> list[dict]:
    mask = (index.column("label").to_numpy() == label) & (index.column("kept").to_numpy(zero_copy_only=False) == kept)
    return index.filter(mask).select(["tile_id", "shard", "reason"]).to_pylist()


def _ci(ci: dict) -> str:
    if ci.get("ci_low") is None:
        return f"{ci['mean']:.3f}"
    return f"{ci['mean']:.3f} ± {ci['sd']:.3f}<br><small>[{ci['ci_low']:.3f}, {ci['ci_high']:.3f}]</small>"


def _evaluation_html(result: dict, put) -> str:

    classes = result["classes"]
    external = result.get("external_tests", {})
    rows = "".join(
        f"<tr><td>{_labels(r)}</td><td>{html.escape(r.get('arm', arm))}</td>"
        f"<td>{_train_tiles(r)}</td><td>{_steps(r)}</td>"
        f"<td>{_ci(r['accuracy'])}</td><td>{_ci(r['balanced_accuracy'])}</td><td>{_ci(r['macro_f1'])}</td><td>{_ci(r['val_macro_f1'])}</td>"
        + "".join(f"<td>{_ci(r['external'][name]['accuracy'])}</td>" for name in external)
        + "</tr>"
        for arm, r in result["arms"].items()
    )
    sets = ""
    for name, t in external.items():
        quarantined = f", {len(t['quarantined'])} files quarantined" if t["quarantined"] else ""
        source = html.escape(t["uri"])
        sets += f" External test set <b>{html.escape(name)}</b>: {t['tiles']} tiles from {source}{quarantined}."
    parts = [
        "<h2>Downstream accuracy (test split and external test sets)</h2>",
        f"<p class='note'>{result['seeds']} seeds per arm; mean ± sd and a 95% t-interval over seeds. "
        f"Test tiles: {result['test_tiles']}. "
        + (
            "At each label fraction every arm trains for the same number of optimizer steps (a budget set by its real "
            "labeled tiles); a pseudo-label student's teacher trained the steps in brackets before it. "
            if "external_tests" in result
            else ""
        )
        + "Epochs were chosen on val macro-F1; each model read the test split"
        f"{' and each external test set' if external else ''} once, after training.{sets}</p>",
        "<table><tr><th>labels (tiles)</th><th>arm</th><th>train "
        "tiles</th><th>steps</th><th>accuracy</th><th>balanced accuracy</th><th>macro-F1</th>"
        "<th>val macro-F1</th>"
        + "".join(f"<th>{html.escape(name)} accuracy</th>" for name in external)
        + f"</tr>{rows}</table>",
    ]
    if len(result.get("label_fractions", [])) > 1:
        parts.append(
            _figure(
                put("label_efficiency.png", _label_efficiency_png(result)),
                "test accuracy against the number of labeled train tiles: mean and 95% t-interval over seeds",
            )
        )
    arms = list(result["arms"])
    columns = min(len(arms), 5)
    fig, axes = plt.subplots(
        math.ceil(len(arms) / columns),
        columns,
        figsize=(3.2 * columns, 3 * math.ceil(len(arms) / columns)),
        squeeze=False,
    )
    for ax in axes.flat[len(arms) :]:
        ax.axis("off")
    for ax, arm in zip(axes.flat, arms):
        m = np.array(result["arms"][arm]["confusion"], dtype=float)
        norm = m / np.maximum(m.sum(1, keepdims=True), 1)
        ax.imshow(norm, vmin=0, vmax=1, cmap="Blues")
        for i in range(len(classes)):
            for j in range(len(classes)):
                ax.text(
                    j, i, int(m[i, j]), ha="center", va="center", fontsize=7, color="k" if norm[i, j] < 0.6 else "w"
                )
        ax.set_xticks(range(len(classes)), classes, fontsize=7)
        ax.set_yticks(range(len(classes)), classes, fontsize=7)
        ax.set_title(arm, fontsize=8)
        ax.set_xlabel("predicted", fontsize=7)
    for ax in axes[:, 0]:
        ax.set_ylabel("true", fontsize=7)
    fig.tight_layout()
    parts.append(
        _figure(
            put("confusion.png", _png(fig)),
            "confusion matrices on the test split, summed over seeds (row-normalised colour)",
        )
    )
    recall_rows = "".join(
        f"<tr><td>{html.escape(arm)}</td>"
        + "".join(f"<td>{v:.3f}</td>" if v == v else "<td>-</td>" for v in r["per_class_recall"].values())
        + "</tr>"
        for arm, r in result["arms"].items()
    )
    parts.append(
        "<table><tr><th>recall per class</th>"
        + "".join(f"<th>{html.escape(c)}</th>" for c in classes)
        + f"</tr>{recall_rows}</table>"
    )
    generation = result.get("generation")
    if generation:
        parts.append(
            f"<h2>Generation metrics</h2><p class='note'>Features: {html.escape(generation['features'])}. "
            "Synthetic (kept) vs real val tiles. Small samples bias FID upwards; KID is unbiased.</p>"
        )
        for name, per in generation.items():
            if name == "features":
                continue
            parts.append(
                f"<h3>{html.escape(name)}</h3><table><tr><th>class</th><th>FID</th><th>KID</th><th>precision</th>"
                "<th>recall</th><th>n real</th><th>n synthetic</th></tr>"
                + "".join(
                    f"<tr><td>{html.escape(c)}</td>"
                    + "".join(
                        f"<td>{v[k]:.3f}</td>" if k in v else "<td>-</td>"
                        for k in ("fid", "kid", "precision", "recall")
                    )
                    + f"<td>{v['n_real']}</td><td>{v['n_synthetic']}</td></tr>"
                    for c, v in per.items()
                )
                + "</table>"
            )
    return "".join(parts)


def _labels(row: dict) -> str:
    return (
        f"{row['label_fraction']:g} ({row['labeled_tiles']})" if "label_fraction" in row else "-"
    )  # older evaluations: one fraction


def _train_tiles(row: dict) -> str:
    return f"{row['train_tiles']}" + (
        f" + {row['pseudo_labeled']:.0f} pseudo-labeled" if "pseudo_labeled" in row else ""
    )


def _steps(row: dict) -> str:
    return f"{row.get('steps', '-')}" + (f" (+{row['teacher_steps']} teacher)" if "teacher_steps" in row else "")


def _label_efficiency_png(result: dict) -> bytes:
    """Accuracy against labeled tiles, one line per arm, with the seeds' 95% t-intervals."""

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for arm in dict.fromkeys(r["arm"] for r in result["arms"].values()):
        rows = sorted((r for r in result["arms"].values() if r["arm"] == arm), key=lambda r: r["labeled_tiles"])
        mean = np.array([r["accuracy"]["mean"] for r in rows])
        low = np.array(
            [r["accuracy"]["ci_low"] if r["accuracy"]["ci_low"] is not None else r["accuracy"]["mean"] for r in rows]
        )
        high = np.array(
            [r["accuracy"]["ci_high"] if r["accuracy"]["ci_high"] is not None else r["accuracy"]["mean"] for r in rows]
        )
        ax.errorbar(
            [r["labeled_tiles"] for r in rows],
            mean,
            yerr=[mean - low, high - mean],
            marker="o",
            ms=4,
            capsize=3,
            label=arm,
        )
    ax.set_xscale("log")
    ax.set_xlabel("labeled train tiles (label fraction)")
    ax.set_ylabel("test accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return _png(fig)


def _fidelity_html(result: dict) -> str:

    parts = [
        "<h2>Fidelity of the kept synthetic tiles</h2>",
        f"<p class='note'>{html.escape(result['oracle']['note'])}</p>",
        f"<p class='note'>Reference: the {result['real_val_tiles']} real val tiles. Precision/recall "
        f"(k={result['precision_recall_k']}), FID and KID on {html.escape(result['features'])}. "
        f"C2ST: {html.escape(result['c2st']['what'])}; n = tiles per side.</p>",
    ]
    header = "".join(f"<th>{html.escape(h)}</th>" for h in TABLE_HEADER)

    def table(per_class: dict) -> str:
        rows = "".join(
            "<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in row) + "</tr>" for row in table_rows(per_class)
        )
        return f"<table><tr>{header}</tr>{rows}</table>"

    for name, s in result["sets"].items():
        parts.append(f"<h3>{html.escape(name)}: {html.escape(s['uri'])}</h3>{table(s['per_class'])}")
    if result.get("ceiling"):
        ceiling = result["ceiling"]
        parts.append(
            f"<h3>{html.escape(ceiling_title(ceiling))}</h3>"
            f"<p class='note'>{html.escape(CEILING_NOTE)}</p>{table(ceiling['per_class'])}"
        )
    return "".join(parts)
