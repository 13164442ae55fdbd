"""The few-shot curve: score against number of shots, one line per task, as a PNG."""
from __future__ import annotations

from pathlib import Path
from typing import Union

from .results import METRIC_LABELS, EvalResults

__all__ = ["plot_curve"]


def plot_curve(results: EvalResults, path: Union[str, Path], title: str = "few-shot evaluation") -> Path:
    """Save score x100 against shots (evenly spaced ticks 0, 1, 2, 4, 8 ...) for every
    (task, metric) row except exact match (it equals VQA accuracy on the world's unambiguous
    answers); accuracies on the left axes, CIDEr on the right ones when present; dashed
    lines at chance. Uses matplotlib's Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    rows = [(t, m) for t, m in results.rows() if m != "exact_match"]
    if not rows:
        raise ValueError("expected results with at least one task, got none")
    groups = [g for g in (["accuracy", "vqa_accuracy"], ["cider"]) if any(m in g for _, m in rows)]
    shots = results.shots()
    pos = {k: i for i, k in enumerate(shots)}
    fig, axes = plt.subplots(1, len(groups), figsize=(5.5 * len(groups), 4), squeeze=False)
    n_way = results.suite.get("n_way")
    for ax, group in zip(axes[0], groups):
        for task, metric in rows:
            if metric not in group:
                continue
            ks, ys = results.curve(task, metric)
            label = f"{task} ({n_way}-way, {METRIC_LABELS[metric]})" if task == "classify" else \
                f"{task} ({METRIC_LABELS[metric]})"
            line, = ax.plot([pos[k] for k in ks], [100 * y for y in ys], marker="o", label=label)
            chance = next((c.chance for c in results.cells if c.task == task and c.metric == metric), None)
            if chance is not None:
                ax.axhline(100 * chance, color=line.get_color(), linestyle="--", linewidth=0.8,
                           label=f"{task} chance")
        ax.set_xticks(range(len(shots)), [str(k) for k in shots])
        ax.set_xlabel("shots (examples in the prompt; per class for classify)")
        ax.set_ylabel("CIDEr x100" if group == ["cider"] else "accuracy (%)")
        if group != ["cider"]:
            ax.set_ylim(-2, 102)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{title} ({results.suite.get('split')} split, {max(c.n for c in results.cells)} queries per point)")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
