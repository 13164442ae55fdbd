"""Few-shot evaluation: metrics, support selection (random / RICES), task suites, the runner.

    from flamingo_rt.eval import TaskSuite, evaluate
    res = evaluate("path/to/model", TaskSuite(tasks=("classify", "qa"), shots=(0, 1, 2), episodes=20))
    print(res.table()); res.save_json("eval.json")

``flamingo-rt eval MODEL_DIR`` runs the same from the shell.
"""
from .metrics import caption_tokens, cider_d, cider_d_scores, exact_match, normalize_answer, vqa_accuracy
from .results import Cell, EvalResults
from .rices import RicesIndex, pooled_features, random_support
from .runner import build_prompt, draw_episode, evaluate, media_needed, select_support
from .suite import DEFAULT_SHOTS, DEFAULT_TASKS, TaskSuite, task_kind

__all__ = [
    "Cell", "DEFAULT_SHOTS", "DEFAULT_TASKS", "EvalResults", "RicesIndex", "TaskSuite", "build_prompt",
    "caption_tokens", "cider_d", "cider_d_scores", "draw_episode", "evaluate", "exact_match", "media_needed",
    "normalize_answer", "pooled_features", "random_support", "select_support", "task_kind", "vqa_accuracy",
]
