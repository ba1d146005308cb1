"""Pictures of the function-vector results: head AIE maps and accuracy-versus-layer curves (PNG, matplotlib)."""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from fvpatch.atomic import write_figure  # noqa: E402


def plot_head_maps(maps: dict[str, np.ndarray], path: str | Path, top: dict[str, list[tuple[int, int]]] | None = None) -> Path:
    """One panel per task: the AIE of each head, layer (rows) by head (columns); chosen heads outlined."""
    path = Path(path)
    fig, axes = plt.subplots(1, len(maps), figsize=(1.2 + 1.6 * len(maps), 5.2), squeeze=False, sharey=True)
    vmax = max(float(np.abs(m).max()) for m in maps.values()) or 1.0
    for ax, (name, aie) in zip(axes[0], maps.items()):
        im = ax.imshow(aie, cmap="RdBu_r", vmin=-vmax, vmax=vmax, aspect="auto", origin="lower")
        for L, h in (top or {}).get(name, []):
            ax.add_patch(plt.Rectangle((h - 0.5, L - 0.5), 1, 1, fill=False, edgecolor="black", linewidth=1.2))
        L, h = np.unravel_index(np.argmax(aie), aie.shape)
        ax.text(h, L, f"{aie[L, h]:.2f}", ha="center", va="center", fontsize=7, color="white")
        ax.set_title(name, fontsize=9)
        ax.set_xticks(range(aie.shape[1]))
        ax.set_xlabel("head")
    axes[0][0].set_ylabel("layer")
    axes[0][0].set_yticks(range(0, next(iter(maps.values())).shape[0], 2))
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="AIE: gain in P(answer's first token)")
    fig.suptitle("Average indirect effect of each attention head (boxes: the function vector's heads)", fontsize=10)
    write_figure(fig, path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_layer_curves(curves: dict[str, dict[str, dict[int, float]]], baselines: dict[str, dict[str, float]], path: str | Path, ylabel: str) -> Path:
    """One panel per task: accuracy against the layer a vector is placed at, one line per method,
    with the task's unpatched baselines (e.g. zero-shot, ICL) as horizontal lines."""
    path = Path(path)
    n = len(curves)
    cols = min(3, n)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False, sharey=True)
    styles = ["-o", "-s", "-^", "-d"]
    for ax, (name, methods) in zip(axes.flat, curves.items()):
        for style, (method, acc) in zip(styles, methods.items()):
            layers = sorted(acc)
            ax.plot(layers, [acc[L] for L in layers], style, markersize=3, label=method)
        for (label, value), ls in zip(baselines.get(name, {}).items(), [":", "--", "-."]):
            ax.axhline(value, color="gray", linestyle=ls, linewidth=1, label=label)
        ax.set_title(name, fontsize=10)
        ax.set_ylim(-0.03, 1.03)
        ax.set_xticks(range(0, max(max(acc) for acc in methods.values()) + 1, 2))
        ax.set_xlabel("layer")
        ax.grid(alpha=0.3)
    for ax in axes[:, 0]:
        ax.set_ylabel(ylabel)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    write_figure(fig, path, dpi=120)
    plt.close(fig)
    return path
