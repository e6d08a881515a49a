"""Learning-curve figures like the paper's Figures 4, 5, 7 and 8, written as PNG."""

from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")  # Files only; no display on servers and CI.
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def figure(
  optimizers: Sequence[dict],
  path: str,
  panels: Sequence[tuple[str, str]] = (("mean_curve", ""),),
  *,
  title: str = "",
  ylabel: str = "mean loss",
  log_scale: bool = True,
  zoom: bool = False,
) -> None:
  """One panel per ``(curve key, panel title)``: every optimizer's curve against step.

  ``optimizers`` are summaries in legend order. Learned optimizers are solid lines, baselines
  dashed, as in the paper. ``zoom``: the y-axis runs from the lowest value to a little above the
  first step's (a baseline's early spike can leave it), as Figure 8 does.
  """
  fig, axes = plt.subplots(
    1, len(panels), figsize=(6 + 5 * (len(panels) - 1), 4.5), dpi=120, sharey=True, squeeze=False
  )
  for ax, (key, panel) in zip(axes[0], panels, strict=True):
    for r in optimizers:
      curve = np.asarray(r[key], dtype=float)
      label = (
        r["name"] if r["learning_rate"] is None else f"{r['name']} (lr {r['learning_rate']:.2g})"
      )
      learned = r["kind"] == "learned"
      ax.plot(curve, "-" if learned else "--", label=label, linewidth=2 if learned else 1.3)
    if log_scale:
      ax.set_yscale("log")
    if zoom:
      lines = [np.asarray(r[key], float) for r in optimizers]
      low = min(float(np.nanmin(c)) for c in lines)
      ax.set_ylim(0.95 * low, 1.5 * max(float(c[0]) for c in lines))
    ax.set_xlabel("step")
    ax.set_title(panel)
    ax.grid(alpha=0.3, which="both")
  axes[0][0].set_ylabel(ylabel)
  axes[0][-1].legend(fontsize=8 if len(panels) == 1 else 7)
  if len(panels) > 1:
    fig.suptitle(title)
  else:
    axes[0][0].set_title(title)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


def plot_curves(results: dict, path: str, title: str = "", log_scale: bool = True) -> None:
  """Mean loss against step for every optimizer in ``results`` (as from ``eval.compare``)."""
  figure(
    sorted(results["optimizers"], key=lambda r: r["final_mean"]),
    path,
    title=title or f"{results['task'].get('name', '')} ({results['num_problems']} problems)",
    log_scale=log_scale,
  )


def image_grid(rows, path: str, min_size: int = 256) -> str:
  """Rows of equal-sized uint8 images (height, width, 3) as one PNG, each image scaled up by an
  integer factor (nearest neighbour) to about ``min_size`` pixels; returns ``path``."""
  from PIL import Image

  grid = np.concatenate([np.concatenate(row, axis=1) for row in rows], axis=0)
  scale = max(1, min_size // rows[0][0].shape[0])
  size = (grid.shape[1] * scale, grid.shape[0] * scale)
  Image.fromarray(grid).resize(size, Image.Resampling.NEAREST).save(path)
  return path
