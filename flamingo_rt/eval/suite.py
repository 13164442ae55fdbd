"""What to evaluate: a few-shot task suite over the procedural world."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Dict, Optional, Tuple

from ..world.attributes import SPLITS
from ..world.episodes import CLASSIFY_BY, TASKS

__all__ = ["TaskSuite", "DEFAULT_TASKS", "DEFAULT_SHOTS", "task_kind"]

DEFAULT_TASKS = ("classify", "qa", "caption", "video_caption", "video_qa")
DEFAULT_SHOTS = (0, 1, 2, 4, 8)
SELECTIONS = ("random", "rices")


def task_kind(task: str) -> str:
    """How a world task is scored: "classify" (rank the candidates by log-likelihood),
    "caption" (generate, CIDEr-D) or "qa" (generate, exact match and VQA accuracy)."""
    if task not in TASKS:
        raise ValueError(f"expected a task in {TASKS}, got {task!r}")
    if task == "classify":
        return "classify"
    if task in ("caption", "video_caption"):
        return "caption"
    return "qa"


@dataclass
class TaskSuite:
    """A few-shot evaluation suite.

    Attributes:
        tasks: world tasks (``flamingo_rt.world.TASKS``).
        shots: numbers of solved examples in the prompt; for "classify", examples *of each
            class* (so ``n_way * k`` in all).
        episodes: queries per task; every shot count uses the same queries (paired).
        seed: everything (episodes, random selection) is a function of it.
        split: "heldout" (held-out attribute combinations, formats and words; default) or "train".
        format_split: phrasings from this split (default: ``split``).
        n_way, by: classes of a "classify" episode and what a class is ("shape", "colour", "shape_colour").
        selection: "random" or "rices" (nearest pool images by vision features).
        pool: support pool per episode (per class for "classify"); default ``max(shots)`` for
            random selection and ``4 * max(shots)`` for RICES.
        num_beams: 1 = greedy decoding of open-ended answers; > 1 beam search.
        length_penalty: the beam search's (finished beams rank by log-likelihood / length **
            length_penalty); 0.0 as open_flamingo's evaluation (captioning and VQA).
        max_new_tokens_answer / max_new_tokens_caption: generation limits (decoding stops
            earlier at ``<|endofchunk|>``).
        num_references: reference captions per query for CIDEr-D (the episode's answer plus
            other captions of the same scene/clip, duplicates dropped).
        image_size, num_frames: world media size (images (3, S, S), clips (F, 3, S, S)).
        batch_size: queries run together: generated as one batch, or their candidates
            scored as one (:meth:`~flamingo_rt.runtime.Generator.score_batch`).
        rank_answers: QA tasks also get "ranked accuracy": the question type's possible
            answers (the world's answer set) ranked by log-likelihood as classify does,
            with its chance level (1 / answers) beside it; the generated answer is still
            scored by exact match and VQA accuracy.
    """

    tasks: Tuple[str, ...] = DEFAULT_TASKS
    shots: Tuple[int, ...] = DEFAULT_SHOTS
    episodes: int = 20
    seed: int = 0
    split: str = "heldout"
    format_split: Optional[str] = None
    n_way: int = 5
    by: str = "shape"
    selection: str = "random"
    pool: Optional[int] = None
    num_beams: int = 1
    length_penalty: float = 0.0
    max_new_tokens_answer: int = 8
    max_new_tokens_caption: int = 24
    num_references: int = 5
    image_size: int = 64
    num_frames: int = 8
    batch_size: int = 8
    rank_answers: bool = True

    def __post_init__(self):
        # one task or one shot count may be given alone ("caption" iterated as 'c', 'a', ...)
        self.tasks = (self.tasks,) if isinstance(self.tasks, str) else tuple(self.tasks)
        self.shots = (self.shots,) if isinstance(self.shots, int) else self.shots
        self.shots = tuple(int(k) for k in self.shots)
        self.validate()

    def validate(self) -> "TaskSuite":
        def bad(name, want):
            raise ValueError(f"expected {name} {want}, got {getattr(self, name)!r}")

        if not self.tasks:
            bad("tasks", "a non-empty list")
        for t in self.tasks:
            if t not in TASKS:
                raise ValueError(f"expected tasks from {TASKS}, got {t!r}")
        if len(set(self.tasks)) != len(self.tasks):
            bad("tasks", "without repeats")
        if not self.shots or any(k < 0 for k in self.shots) or len(set(self.shots)) != len(self.shots):
            bad("shots", "distinct numbers >= 0")
        if self.episodes < 1:
            bad("episodes", ">= 1")
        if self.split not in SPLITS:
            bad("split", f"in {SPLITS}")
        if self.format_split is not None and self.format_split not in SPLITS:
            bad("format_split", f"None or in {SPLITS}")
        if self.split == "train" and self.format_split == "heldout":
            raise ValueError("expected format_split 'train' (or None) with split 'train', got 'heldout'")
        if self.n_way < 2:
            bad("n_way", ">= 2")
        if self.by not in CLASSIFY_BY:
            bad("by", f"in {CLASSIFY_BY}")
        if self.selection not in SELECTIONS:
            bad("selection", f"in {SELECTIONS}")
        if self.pool is not None and self.pool < max(self.shots):
            bad("pool", f">= the largest shot count {max(self.shots)}")
        for name in ("num_beams", "max_new_tokens_answer", "max_new_tokens_caption", "num_references",
                     "image_size", "num_frames", "batch_size"):
            if getattr(self, name) < 1:
                bad(name, ">= 1")
        return self

    @property
    def pool_size(self) -> int:
        """Support pool per episode (per class for "classify")."""
        if self.pool is not None:
            return self.pool
        return max(self.shots) * (4 if self.selection == "rices" else 1)

    def to_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        d["tasks"], d["shots"] = list(self.tasks), list(self.shots)
        d["pool_size"] = self.pool_size
        return d
