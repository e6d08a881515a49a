"""Learning-curve figures like the paper's Figures 4, 5, 7 and 8, written as PNG."""

import matplotlib

matplotlib.use("Agg")  # Files only; no display on servers and CI.
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def plot_curves(results: dict, path: str, title: str = "", log_scale: bool = True) -> None:
  """Mean loss against step for every optimizer in ``results`` (as from ``eval.compare``).

  Learned optimizers are solid lines, baselines dashed, as in the paper.
  """
  fig, ax = plt.subplots(figsize=(6, 4.5), dpi=120)
  for r in sorted(results["optimizers"], key=lambda r: r["final_mean"]):
    curve = np.asarray(r["mean_curve"], dtype=float)
    label = (
      r["name"] if r["learning_rate"] is None else f"{r['name']} (lr {r['learning_rate']:.2g})"
    )
    style = "-" if r["kind"] == "learned" else "--"
    ax.plot(np.arange(len(curve)), curve, style, label=label, linewidth=2 if style == "-" else 1.3)
  if log_scale:
    ax.set_yscale("log")
  ax.set_xlabel("step")
  ax.set_ylabel("mean loss")
  ax.set_title(title or f"{results['task'].get('name', '')} ({results['num_problems']} problems)")
  ax.grid(alpha=0.3, which="both")
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)
