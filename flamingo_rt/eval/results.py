"""Evaluation results: one score per (task, metric, shots) cell, per-query records, the
printed table and the JSON file."""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

__all__ = ["Cell", "EvalResults", "METRIC_LABELS"]

#: metric -> how the table names it
METRIC_LABELS = {"accuracy": "accuracy", "exact_match": "exact match", "vqa_accuracy": "VQA acc", "cider": "CIDEr",
                 "ranked_accuracy": "ranked acc"}


@dataclass
class Cell:
    """The score of ``metric`` on ``task`` with ``shots`` examples (per class for classify),
    averaged over ``n`` queries. Accuracies are in [0, 1]; CIDEr on the coco-caption scale
    (10 x the mean n-gram cosine). ``chance``: the accuracy of guessing (classify, and
    ranked accuracy of QA: the mean of 1 / possible answers over the cell's queries).
    ``skipped``: why the cell was not evaluated (then ``score`` is None and ``n`` 0), e.g.
    prompts longer than the model's context."""

    task: str
    metric: str
    shots: int
    score: Optional[float]
    n: int
    chance: Optional[float] = None
    skipped: Optional[str] = None


@dataclass
class EvalResults:
    """What :func:`flamingo_rt.eval.evaluate` returns."""

    model: str
    suite: Dict[str, Any]
    cells: List[Cell]
    records: List[Dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0

    def score(self, task: str, shots: int, metric: Optional[str] = None) -> Optional[float]:
        """One cell's score (``metric`` may be omitted when the task has one metric); None
        for a skipped cell."""
        found = [c for c in self.cells if c.task == task and c.shots == shots and (metric is None or c.metric == metric)]
        if len(found) != 1:
            have = sorted({(c.task, c.metric, c.shots) for c in self.cells})
            raise KeyError(f"expected one cell for task={task!r} shots={shots} metric={metric!r}, "
                           f"found {len(found)}; cells: {have}")
        return found[0].score

    def rows(self) -> List[Tuple[str, str]]:
        """(task, metric) pairs in evaluation order."""
        out: List[Tuple[str, str]] = []
        for c in self.cells:
            if (c.task, c.metric) not in out:
                out.append((c.task, c.metric))
        return out

    def shots(self) -> List[int]:
        return sorted({c.shots for c in self.cells})

    def curve(self, task: str, metric: str) -> Tuple[List[int], List[float]]:
        """(shots, scores) of one row, skipped cells left out."""
        pts = sorted((c.shots, c.score) for c in self.cells
                     if c.task == task and c.metric == metric and c.score is not None)
        return [k for k, _ in pts], [s for _, s in pts]

    def table(self) -> str:
        """A text table: one row per (task, metric), one column per shot count; scores
        x100 (accuracy in %, CIDEr as papers print it)."""
        shots = self.shots()
        n_way = self.suite.get("n_way")

        def task_name(task: str) -> str:
            return f"{task} ({n_way}-way)" if task == "classify" and n_way else task

        w = max([22] + [len(task_name(t)) + 2 for t, _ in self.rows()])
        head = f"{'task':<{w}}{'metric':<13}{'n':>5}{'chance':>8}" + "".join(f"{f'{k}-shot':>9}" for k in shots)
        lines = [head, "-" * len(head)]
        for task, metric in self.rows():
            cells = {c.shots: c for c in self.cells if c.task == task and c.metric == metric}
            first = next(iter(cells.values()))
            n = max(c.n for c in cells.values())
            name = task_name(task)
            chance = f"{100 * first.chance:.1f}" if first.chance is not None else "-"
            vals = "".join(f"{'':>9}" if k not in cells else f"{'n/a':>9}" if cells[k].score is None
                           else f"{100 * cells[k].score:9.1f}" for k in shots)
            lines.append(f"{name:<{w}}{METRIC_LABELS.get(metric, metric):<13}{n:>5}{chance:>8}{vals}")
        lines.append(f"(scores x100; shots: examples in the prompt, per class for classify; "
                     f"{self.suite.get('split')} split, {self.suite.get('selection')} support selection, "
                     f"{self.seconds:.1f} s)")
        notes = sorted({f"{c.task}: {c.skipped}" for c in self.cells if c.skipped})
        lines += [f"n/a: {note}" for note in notes]
        return "\n".join(lines)

    def to_dict(self) -> Dict[str, Any]:
        return {"model": self.model, "suite": self.suite, "seconds": self.seconds,
                "cells": [asdict(c) for c in self.cells], "records": self.records}

    def save_json(self, path: Union[str, Path]) -> Path:
        """Write :meth:`to_dict` as JSON (atomically: temp file + rename)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(self.to_dict(), f, indent=1)
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        return path

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "EvalResults":
        return cls(d["model"], d["suite"], [Cell(**c) for c in d["cells"]], d.get("records", []), d.get("seconds", 0.0))
