"""Figures the chapters share: scatter plots, trajectories, forward strips, image grids, animations."""

from __future__ import annotations

import re

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib import animation


def scatter(ax, x, *, lim: float = 3.0, title: str | None = None, **kwargs):
    """A 2D point cloud with equal axes and a fixed window, so panels compare at a glance."""
    x = torch.as_tensor(x).detach().cpu()
    kwargs = {"s": 1.5, "alpha": 0.5, "color": "C0", "rasterized": True} | kwargs
    ax.scatter(x[:, 0], x[:, 1], **kwargs)
    ax.set(xlim=(-lim, lim), ylim=(-lim, lim), aspect="equal", xticks=[], yticks=[])
    if title:
        ax.set_title(title, fontsize=9)
    return ax


def trajectories(ax, path, *, n: int = 64, lim: float = 3.0, cmap: str = "viridis"):
    """Paths of ``n`` particles, ``path`` of shape (steps, B, 2), coloured from noise (dark) to data (light)."""
    from matplotlib.collections import LineCollection

    path = torch.as_tensor(path).detach().cpu().double()[:, :n].numpy()
    steps = path.shape[0] - 1
    # one collection of (steps * n) segments: one plot call per step is slow for 1000-step paths
    segments = np.stack([path[:-1], path[1:]], axis=2).reshape(-1, 2, 2)  # (steps * n, 2 points, xy)
    colors = np.repeat(plt.get_cmap(cmap)(np.linspace(0, 1, steps)), path.shape[1], axis=0)
    ax.add_collection(LineCollection(segments, colors=colors, linewidths=0.6, alpha=0.8))
    ax.scatter(path[0, :, 0], path[0, :, 1], s=6, color="k", label="start (noise)", zorder=3)
    ax.scatter(path[-1, :, 0], path[-1, :, 1], s=6, color="C3", label="end (sample)", zorder=3)
    ax.set(xlim=(-lim, lim), ylim=(-lim, lim), aspect="equal", xticks=[], yticks=[])
    return ax


def strip(states, times, *, title: str | None = None, lim: float = 3.0, size: float = 1.8, **kwargs):
    """One scatter panel per state, e.g. the forward process at several times. Returns the figure."""
    fig, axes = plt.subplots(1, len(states), figsize=(size * len(states), size * 1.25), layout="constrained")
    for ax, x, t in zip(np.atleast_1d(axes), states, times):
        scatter(ax, x, lim=lim, title=f"t = {float(t):.2f}", **kwargs)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def image_grid(images, nrow: int = 8, pad: int = 1) -> np.ndarray:
    """Tile ``(B, C, H, W)`` images in [-1, 1] into one array in [0, 1] (grey for C = 1)."""
    x = ((torch.as_tensor(images).detach().cpu().float().clamp(-1, 1) + 1) / 2).numpy()
    b, c, h, w = x.shape
    ncol = -(-b // nrow)
    grid = np.ones((c, ncol * (h + pad) + pad, nrow * (w + pad) + pad))
    for i in range(b):
        r, q = divmod(i, nrow)
        grid[
            :, pad + r * (h + pad) : pad + r * (h + pad) + h, pad + q * (w + pad) : pad + q * (w + pad) + w
        ] = x[i]
    return grid[0] if c == 1 else grid.transpose(1, 2, 0)


def show_images(ax, images, nrow: int = 8, title: str | None = None):
    ax.imshow(image_grid(images, nrow), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.set(xticks=[], yticks=[])
    if title:
        ax.set_title(title, fontsize=9)
    return ax


def animate(fig, update, frames: int, interval: int = 120):
    """An animation that works on the static website: ``update(i)`` redraws frame ``i``.

    Returns an ``IPython.display.HTML`` with the frames embedded as JavaScript (``to_jshtml``), so
    it plays in JupyterLab and in the built book alike, with no kernel.
    """
    from IPython.display import HTML

    anim = animation.FuncAnimation(fig, update, frames=frames, interval=interval)
    html = anim.to_jshtml(default_mode="once")
    # matplotlib's player links Font Awesome 4 from a CDN for its button icons; the book's theme
    # already loads Font Awesome, and nothing the book runs may need the internet
    html = re.sub(r'<link rel="stylesheet"\s+href="https://maxcdn\.bootstrapcdn\.com/[^"]*">', "", html)
    plt.close(fig)
    return HTML(html)


def markdown_table(header, rows, fmt: str = "{:.3f}") -> str:
    """A Markdown table: floats formatted with ``fmt``, anything else with ``str``, and a ``|`` inside a
    cell escaped (unescaped, it would end the cell and leave the whole table as text on the page)."""

    def cell(value) -> str:
        text = fmt.format(value) if isinstance(value, float) else str(value)
        return text.replace("|", "\\|")

    lines = ["| " + " | ".join(map(cell, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(cell, row)) + " |" for row in rows]
    return "\n".join(lines)


def show_table(header, rows, fmt: str = "{:.3f}") -> None:
    """Display :func:`markdown_table` in a notebook: it renders as a table there and in the book."""
    from IPython.display import Markdown, display

    display(Markdown(markdown_table(header, rows, fmt)))
