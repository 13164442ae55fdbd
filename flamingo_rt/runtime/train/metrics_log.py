"""Training logs: a progress bar on stdout and one JSON object per logged step in a file."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Dict, Optional

__all__ = ["MetricsLog"]


class MetricsLog:
    """Writes ``log.jsonl`` lines ``{"step", "lr", "loss": {dataset: value}, "loss_weighted",
    "grad_norm", "tokens", "tokens_per_s", "step_time_s", "gates": {layer: [tanh attn,
    tanh ff]}, "bad_records": {dataset: {reason: count}}}`` and drives a tqdm bar.

    On resume, lines of steps after the resumed step are dropped (they belong to the part
    of the killed run that is being redone), so the file reads as one uninterrupted run.
    """

    def __init__(self, path: Path, total_steps: int, start_step: int, progress: bool, enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled
        self.bar = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            kept = []
            for line in self.path.read_text().splitlines():
                try:
                    if json.loads(line).get("step", 0) <= start_step:
                        kept.append(line + "\n")
                except ValueError:
                    pass  # a line cut short by a kill
            self.path.write_text("".join(kept))
        if progress:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step",
                            dynamic_ncols=True, file=sys.stdout)

    def log(self, record: Dict[str, Any], postfix: Optional[Dict[str, str]] = None) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.bar is not None:
            if postfix:
                self.bar.set_postfix(postfix, refresh=False)

    def advance(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
