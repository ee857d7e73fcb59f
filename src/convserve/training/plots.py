"""PNG figures of a run: learning curves, Glorot & Bengio style histograms, gradient flow,
confusion matrix, first-layer filters and feature maps. Figures are made without pyplot, so
no backend is chosen (and no global state is touched) on import; PNGs are drawn by Agg."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from convserve.training.diagnostics import Snapshot
from convserve.training.model import ConvNet

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def subplots(nrows: int = 1, ncols: int = 1, **kwargs: Any) -> tuple[Figure, Any]:
    """``pyplot.subplots`` without pyplot: a figure that nothing global holds on to."""
    from matplotlib.figure import Figure

    figure_kw = {k: kwargs.pop(k) for k in ("figsize", "dpi") if k in kwargs}
    fig = Figure(**figure_kw)
    return fig, fig.subplots(nrows, ncols, **kwargs)


def save_figure(fig: Figure, path: Path) -> Path:
    """Write ``fig`` as a PNG (creating the folder)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90, bbox_inches="tight")
    return path


def learning_curves(history: list[dict[str, float]], path: Path) -> Path:
    """Loss and accuracy per epoch, train against validation."""
    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_acc) = subplots(1, 2, figsize=(10, 3.6))
    for split in ("train", "val"):
        ax_loss.plot(epochs, [h[f"{split}_loss"] for h in history], marker="o", label=split)
        ax_acc.plot(epochs, [h[f"{split}_accuracy"] for h in history], marker="o", label=split)
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
    ax_acc.set(xlabel="epoch", ylabel="accuracy", title="accuracy", ylim=(0, 1))
    for ax in (ax_loss, ax_acc):
        ax.legend()
        ax.grid(alpha=0.3)
    return save_figure(fig, path)


def histograms(values: dict[str, Tensor], title: str, xlabel: str, path: Path) -> Path:
    """One normalised histogram line per layer, as in Glorot & Bengio 2010, Figures 6 and 7."""
    fig, ax = subplots(figsize=(7, 4))
    finite = {k: v[torch.isfinite(v)] for k, v in values.items() if v.numel()}
    spread = max(
        (float(v.abs().quantile(0.995)) for v in finite.values() if v.numel()), default=1.0
    )
    spread = spread if spread > 0 else 1.0
    bins = np.linspace(-spread, spread, 101)
    for layer, v in finite.items():
        counts, edges = np.histogram(v.numpy(), bins=bins)
        density = counts / max(counts.sum(), 1)
        ax.plot((edges[:-1] + edges[1:]) / 2, density, label=f"{layer} (std {float(v.std()):.2e})")
    ax.set(title=title, xlabel=xlabel, ylabel="share of values")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return save_figure(fig, path)


def gradient_flow(snapshots: list[Snapshot], path: Path) -> Path:
    """Per-layer back-propagated gradient std and weight-gradient norm, first vs last snapshot."""
    first, last = snapshots[0], snapshots[-1]
    layers = list(last.layers)
    x = np.arange(len(layers))
    fig, axes = subplots(1, 2, figsize=(11, 3.8))
    for ax, key, title in (
        (axes[0], "grad_std", "std of dL/d(pre-activation)"),
        (axes[1], "weight_grad_norm", "||dL/dW||"),
    ):
        for offset, snap, label in (
            (-0.2, first, f"step {first.step}"),
            (0.2, last, f"step {last.step}"),
        ):
            vals = [max(snap.layers[n].get(key, 0.0), 1e-30) for n in layers]
            ax.bar(x + offset, vals, width=0.4, label=label)
        ax.set_yscale("log")
        ax.set_xticks(x, layers, rotation=45, ha="right", fontsize=8)
        ax.set_title(title)
        ax.legend(fontsize=8)
    return save_figure(fig, path)


def confusion_matrix(matrix: Tensor, classes: list[str], path: Path) -> Path:
    n = len(classes)
    fig, ax = subplots(figsize=(1.2 + 0.45 * n, 1.0 + 0.45 * n))
    m = matrix.numpy()
    ax.imshow(m, cmap="Blues")
    for i in range(n):
        for j in range(n):
            ax.text(
                j,
                i,
                str(m[i, j]),
                ha="center",
                va="center",
                fontsize=7,
                color="white" if m[i, j] > m.max() / 2 else "black",
            )
    ax.set_xticks(range(n), classes, rotation=45, ha="right", fontsize=7)
    ax.set_yticks(range(n), classes, fontsize=7)
    ax.set(xlabel="predicted", ylabel="true", title="confusion matrix (test or validation)")
    return save_figure(fig, path)


def _grid(tiles: np.ndarray) -> tuple[int, int]:
    cols = math.ceil(math.sqrt(len(tiles)))
    return math.ceil(len(tiles) / cols), cols


def first_layer_filters(model: ConvNet, path: Path) -> Path | None:
    """The first convolution's filters; RGB when it reads three channels, else grey."""
    if not model.block_names:
        return None
    w = model.block(model.block_names[0]).conv.weight.detach().cpu()
    rows, cols = _grid(w.numpy())
    fig, axes = subplots(rows, cols, figsize=(cols * 0.9, rows * 0.9), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, f in zip(axes.flat, w, strict=False):
        f = (f - f.min()) / (f.max() - f.min() + 1e-12)
        ax.imshow(f.permute(1, 2, 0).numpy() if f.size(0) == 3 else f[0].numpy(), cmap="gray")
    fig.suptitle("first-layer filters")
    return save_figure(fig, path)


@torch.no_grad()
def feature_maps(
    model: ConvNet, images: Tensor, out_dir: Path, max_channels: int = 16
) -> list[Path]:
    """For each image, one figure: the input and each block's first channels, each channel
    scaled to its own range."""
    if not model.block_names:
        return []
    model.eval()
    _, features = model.forward_features(images)
    paths = []
    for i in range(images.size(0)):
        rows = len(model.block_names) + 1
        fig, axes = subplots(
            rows, max_channels, figsize=(max_channels * 0.8, rows * 0.9), squeeze=False
        )
        for ax in axes.flat:
            ax.axis("off")
        img = images[i].cpu()
        axes[0][0].imshow(
            img.permute(1, 2, 0).numpy() if img.size(0) == 3 else img[0].numpy(), cmap="gray"
        )
        axes[0][0].set_title("input", fontsize=7)
        for r, name in enumerate(model.block_names, start=1):
            fmap = features[name][i].cpu()
            for c in range(min(max_channels, fmap.size(0))):
                ch = fmap[c]
                ch = (ch - ch.min()) / (ch.max() - ch.min() + 1e-12)
                axes[r][c].imshow(ch.numpy(), cmap="viridis")
                if c == 0:
                    axes[r][c].set_title(name, fontsize=7, loc="left")
        paths.append(save_figure(fig, out_dir / f"feature_maps_{i}.png"))
    return paths


def value_histograms(values: dict[str, dict[str, Tensor]], when: str, folder: Path) -> None:
    """Glorot & Bengio style histograms of activations and back-propagated gradients."""
    acts = {k: v["activation"] for k, v in values.items() if "activation" in v}
    grads = {k: v["gradient"] for k, v in values.items() if "gradient" in v}
    histograms(
        acts, f"activation values ({when})", "activation", folder / f"activations_{when}.png"
    )
    histograms(
        grads,
        f"back-propagated gradients dL/d(pre-activation) ({when})",
        "gradient",
        folder / f"gradients_{when}.png",
    )
