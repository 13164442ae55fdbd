"""The README's Python examples run as written (in order, in one namespace, as a reader
pastes them into one session), and give what their comments say."""
from __future__ import annotations

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_examples_run(capsys, tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert len(blocks) >= 2, "the README's Python tour and generation examples"
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    ns: dict = {"__name__": "readme"}
    for i, src in enumerate(blocks):
        exec(compile(src, f"README.md python block {i}", "exec"), ns)
    capsys.readouterr()
    out = ns["out"]
    assert out.logits.shape == (2, 24, 512) and torch.isfinite(out.loss)
    trainable = [name for name, _ in ns["model"].trainable_parameters()]
    # freeze_backbones: the resampler and the gated cross-attention layers train, nothing else
    assert trainable and all(n.startswith(("resampler.", "lm.xattn.")) for n in trainable), trainable
    assert any(n.startswith("lm.xattn.") for n in trainable)


def test_readme_training_config_is_valid(tmp_path):
    """The README's ``run.toml`` example reads as a training config with what it says."""
    from flamingo_rt.runtime.train.config import load_train_config

    blocks = re.findall(r"```toml\n(.*?)```", README.read_text(), re.S)
    assert len(blocks) == 1
    (tmp_path / "run.toml").write_text(blocks[0])
    cfg = load_train_config(tmp_path / "run.toml")
    assert cfg.precision == "bf16" and cfg.steps == 2000 and cfg.prefetch_steps == 1
    assert [(d.name, d.kind, d.weight) for d in cfg.datasets] == [("docs", "interleaved", 1.0), ("pairs", "pairs", 0.2)]
    assert cfg.datasets[0].path == str(tmp_path / "data/docs")
