"""The flamingo-rt command: info, check, generate on a saved tiny model, not-yet commands
(eval and demo: tests/test_eval.py, tests/test_demo.py)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from flamingo_rt import cli
from flamingo_rt.io import FlamingoTokenizer, save_pretrained
from flamingo_rt.models import Flamingo, get_preset
from flamingo_rt.runtime import GenerationConfig, Generator

pytestmark = pytest.mark.usefixtures("malloc_calls")  # the CLI's malloc tuning: recorded, not applied


def test_info_and_check(capsys):
    assert cli.main(["info", "tiny", "flamingo-3b", "--seq-len", "32"]) == 0
    out = capsys.readouterr().out
    assert "flamingo-3b" in out and "3.13B" in out


def _check_rows(out: str) -> dict:
    """check's op table: op -> (backends, pick on cpu, pick on cuda)."""
    lines = out.splitlines()
    head = next(i for i, line in enumerate(lines) if line.split()[:2] == ["op", "backends"])
    rows = {}
    for line in lines[head + 1:]:
        if line.startswith("  ("):
            break
        op, rest = line.split(None, 1)
        cols = [c.strip() for c in rest.split("  ") if c.strip()]
        rows[op] = tuple(cols)
    return rows


def test_check_says_what_each_op_runs_on_each_device(capsys, monkeypatch):
    from flamingo_rt import _ext
    from flamingo_rt.ops import backend

    monkeypatch.delenv("FLAMINGO_RT_BACKEND", raising=False)
    assert cli.main(["check"]) == 0
    out = capsys.readouterr().out
    assert f"torch {torch.__version__}" in out
    assert "flamingo_rt._C: loaded" in out if _ext.load() else "flamingo_rt._C: not loaded" in out
    assert "CPU: " in out and "backend: auto" in out
    rows = _check_rows(out)
    ops = {k.split(".")[0] for k in backend._IMPLS}
    assert set(rows) == ops and "image_causal_attention" in rows
    for op, (impls, on_cpu, on_cuda) in rows.items():
        assert impls == ", ".join(backend.implemented(op))
        assert on_cpu == backend.resolve(op, "auto", torch.device("cpu"))
        assert on_cuda == backend.resolve(op, "auto", torch.device("cuda"))
    if _ext.load():
        assert rows["image_causal_attention"][1] == "cpu"  # the C++ kernels are the CPU default

    # a forced backend: the device where it cannot run says so instead of a pick
    monkeypatch.setenv("FLAMINGO_RT_BACKEND", "reference")
    assert cli.main(["check"]) == 0
    out = capsys.readouterr().out
    assert "backend: reference (FLAMINGO_RT_BACKEND)" in out
    assert all(r[1:] == ("reference", "reference") for r in _check_rows(out).values())
    monkeypatch.setenv("FLAMINGO_RT_BACKEND", "cuda")
    assert cli.main(["check"]) == 0
    rows = _check_rows(capsys.readouterr().out)
    assert rows["image_causal_attention"][1] == "none (cuda cannot run)"


def test_check_says_why_the_extension_did_not_load(capsys, monkeypatch):
    from flamingo_rt import _ext

    monkeypatch.setattr(_ext, "load", lambda: False)
    monkeypatch.setattr(_ext, "error", lambda: "ImportError: undefined symbol _ZN3c10")
    assert cli.main(["check"]) == 0
    out = capsys.readouterr().out
    assert "flamingo_rt._C: not loaded (ImportError: undefined symbol _ZN3c10)" in out
    assert "pip install --no-build-isolation -e ." in out


@pytest.mark.parametrize("cmd", [None, "demo", "eval", "info", "check", "train", "export", "generate", "ablate"])
def test_every_command_prints_its_help(cmd, capsys):
    """``--help`` of the command and each subcommand prints its usage and exits 0 (argparse
    formats help strings with %: a literal one in a help text broke eval's and generate's)."""
    with pytest.raises(SystemExit) as e:
        cli.main(([cmd] if cmd else []) + ["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: ") and (cmd is None or f" {cmd} " in out.splitlines()[0] + " ")
    if cmd in ("eval", "generate"):
        assert "7% faster" in " ".join(out.split())


def test_generate_streams_the_same_text_as_the_api(tmp_path, capsys, malloc_calls, monkeypatch):
    tok = FlamingoTokenizer.train_bpe(["a red square left of a blue circle"] * 30, vocab_size=280)
    cfg = get_preset("tiny")
    cfg.lm.vocab_size = tok.vocab_size
    model = Flamingo(cfg)
    with torch.no_grad():
        for b in model.xattn_blocks():
            b.attn_gate.fill_(0.7)
    save_pretrained(model, tmp_path / "m", tokenizer=tok)
    img = (np.random.rand(64, 64, 3) * 255).astype(np.uint8)
    np.save(tmp_path / "img.npy", img)
    rc = cli.main(["generate", str(tmp_path / "m"), "<image>a red", "--image", str(tmp_path / "img.npy"),
                   "--max-new-tokens", "6"])
    assert rc == 0
    printed = capsys.readouterr().out
    want = Generator(model.eval(), tok).generate([img, "a red"], GenerationConfig(max_new_tokens=6))
    assert printed == want + "\n"
    assert malloc_calls == [1]  # the malloc tuning, unless --default-malloc
    rc = cli.main(["generate", str(tmp_path / "m"), "<image>a red", "--image", str(tmp_path / "img.npy"),
                   "--max-new-tokens", "6", "--default-malloc"])
    assert rc == 0 and capsys.readouterr().out == want + "\n" and malloc_calls == [1]
    # --score: the candidates' log-likelihoods (Generator.score), one "LOGPROB<TAB>TEXT" line each
    cands = [" square left", " blue", " circle"]
    rc = cli.main(["generate", str(tmp_path / "m"), "<image>a red", "--image", str(tmp_path / "img.npy"),
                   "--default-malloc", *[x for c in cands for x in ("--score", c)]])
    lines = capsys.readouterr().out.splitlines()
    assert rc == 0 and [line.split("\t", 1)[1] for line in lines] == cands
    want = Generator(model.eval(), tok).score([img, "a red"], cands)
    assert [float(line.split("\t")[0]) for line in lines] == pytest.approx(want, abs=2e-6)
    # decoding settings reach the GenerationConfig
    rc = cli.main(["generate", str(tmp_path / "m"), "<image>a red", "--image", str(tmp_path / "img.npy"),
                   "--max-new-tokens", "6", "--min-new-tokens", "5", "--repetition-penalty", "1.3", "--default-malloc"])
    want = Generator(model.eval(), tok).generate([img, "a red"], GenerationConfig(
        max_new_tokens=6, min_new_tokens=5, repetition_penalty=1.3))
    assert rc == 0 and capsys.readouterr().out == want + "\n"
    # the beam search settings too (open_flamingo's evaluation runs 3 beams with a length penalty)
    seen = []
    with monkeypatch.context() as m:
        m.setattr(Generator, "generate", lambda self, prompt, cfg: seen.append(cfg) or "x")
        for flags, want_es in (([], False), (["--early-stopping", "true"], True),
                               (["--early-stopping", "never"], "never")):
            assert cli.main(["generate", str(tmp_path / "m"), "a", "--num-beams", "3", "--length-penalty", "0.5",
                             *flags, "--default-malloc"]) == 0
            assert (seen[-1].num_beams, seen[-1].length_penalty, seen[-1].early_stopping) == (3, 0.5, want_es)
    capsys.readouterr()
    assert cli.main(["generate", str(tmp_path / "m"), "a", "--min-new-tokens", "7", "--max-new-tokens", "6",
                     "--default-malloc"]) == 2
    assert "expected min_new_tokens to be an integer in [0, max_new_tokens = 6]" in capsys.readouterr().err
    assert cli.main(["generate", str(tmp_path / "m"), "a", "--score", "", "--default-malloc"]) == 2
    assert "expected non-empty candidates" in capsys.readouterr().err


def test_generate_names_an_image_it_cannot_read(tmp_path, capsys):
    """Missing, undecodable and pickled inputs: exit code 2 and one line naming the file and
    the reason (no traceback); the model folder is not even opened."""
    (tmp_path / "junk.png").write_bytes(b"not a png at all")
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    cases = [(tmp_path / "missing.png", "no such file"), (tmp_path / "junk.png", "as an image"),
             (tmp_path / "objects.npy", "as a numpy array")]
    for path, reason in cases:
        rc = cli.main(["generate", str(tmp_path / "no-model"), "hi", "--image", str(path)])
        err = capsys.readouterr().err
        assert rc == 2, path
        assert err.startswith("flamingo-rt generate: cannot read --image") and str(path) in err and reason in err, err
        assert "Traceback" not in err
    assert cli.main(["generate", str(tmp_path / "no-model"), "hi"]) == 2  # a CheckpointError, was a traceback
    err = capsys.readouterr().err
    assert err.startswith("flamingo-rt generate: ") and "no-model: no such model folder" in err, err


def test_generate_and_export_refuse_a_device_they_cannot_use(tmp_path, capsys, monkeypatch):
    """A CUDA device without CUDA, a device string torch does not parse, a GPU index past the
    last one, a negative temperature: exit code 2 and one line, before any model is loaded."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cases = [(["generate", str(tmp_path / "m"), "hi", "--device", "cuda"], "no CUDA"),
             (["generate", str(tmp_path / "m"), "hi", "--device", "gpu"], "expected --device like cpu"),
             (["generate", str(tmp_path / "m"), "hi", "--temperature", "-1"], "expected --temperature >= 0")]
    for argv, msg in cases:
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("flamingo-rt generate: ") and msg in err, err
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert cli.main(["generate", str(tmp_path / "m"), "hi", "--device", "cuda:1"]) == 2
    assert "only 1 CUDA device(s) are visible" in capsys.readouterr().err
    assert cli._device_problem("cpu") is None and cli._device_problem("cuda:0") is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    assert cli.main(["export", str(tmp_path / "m"), str(tmp_path / "out"), "--device", "cuda"]) == 2
    assert capsys.readouterr().err.startswith("flamingo-rt export: --device cuda: ")
    assert not (tmp_path / "out").exists()
    # an output folder that cannot be made (a file in its path): one line, before any compile
    from flamingo_rt.demo import DEFAULT_MODEL

    (tmp_path / "a-file").write_text("x")
    assert cli.main(["export", str(DEFAULT_MODEL), str(tmp_path / "a-file" / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("flamingo-rt export: ") and "Not a directory" in err, err


def test_counts_out_of_range_are_argument_errors(tmp_path, capsys):
    """Thread counts, sizes and step counts below their minimum stop at argument parsing
    (exit code 2, the option named) instead of a torch traceback or a silent fallback."""
    cases = [(["demo", "--threads", "-1"], "--threads", ">= 1"),
             (["eval", "m", "--threads", "-2"], "--threads", ">= 0"),
             (["eval", "m", "--n-way", "1"], "--n-way", ">= 2"),
             (["info", "tiny", "--seq-len", "-5"], "--seq-len", ">= 1"),
             (["info", "tiny", "--num-media", "0"], "--num-media", ">= 1"),
             (["ablate", "--threads", "-3"], "--threads", ">= 0"),
             (["generate", "m", "hi", "--top-k", "-1"], "--top-k", ">= 0"),
             (["generate", "m", "hi", "--max-new-tokens", "x"], "--max-new-tokens", "expected an integer"),
             (["export", "m", "o", "--max-media", "0"], "--max-media", ">= 1"),
             (["train", "c.toml", "--steps", "-1"], "--steps", ">= 1")]
    for argv, opt, want in cases:
        with pytest.raises(SystemExit) as e:
            cli.main(argv)
        assert e.value.code == 2, argv
        err = capsys.readouterr().err
        assert f"argument {opt}: " in err and want in err, err
    # a recipe preset has per-stage steps: --steps with --preset is refused, not ignored
    assert cli.main(["train", "--preset", "toy", "--steps", "5", "--out-dir", str(tmp_path / "x")]) == 2
    assert "--steps applies to a CONFIG run" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_outputs_that_cannot_be_written_fail_before_the_work(tmp_path, capsys, monkeypatch):
    """demo --out, eval --json / --plot, ablate --json and train --out-dir under a path
    that cannot be made (a file in the way, a folder where a file goes) fail at once with
    one line; eval and ablate wrote their results only after all the work before."""
    import flamingo_rt.eval as eval_pkg
    from flamingo_rt import demo as demo_mod

    (tmp_path / "a-file").write_text("x")
    f = tmp_path / "a-file"
    monkeypatch.setattr(demo_mod, "run_demo", lambda *a, **k: pytest.fail("the demo ran"))
    monkeypatch.setattr(eval_pkg, "TaskSuite", lambda *a, **k: pytest.fail("the evaluation ran"))
    cases = [(["demo", "--out", str(f / "out")], "demo", f"{f} is a file, not a folder"),
             (["eval", "m", "--json", str(f / "r.json")], "eval", f"{f} is a file, not a folder"),
             (["eval", "m", "--plot", str(tmp_path)], "eval", "it is a folder"),
             (["eval", "m", "--json", "/proc/flamingo-rt-test.json"], "eval", "/proc is not writable"),
             (["ablate", "--json", str(f / "r.json")], "ablate", f"{f} is a file, not a folder"),
             (["train", "--preset", "toy", "--out-dir", str(f / "run")], "train", f"{f} is a file, not a folder")]
    for argv, cmd, want in cases:
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith(f"flamingo-rt {cmd}: cannot write ") and want in err, err
    assert cli._output_problem(str(tmp_path / "new" / "deeper" / "r.json"), folder=False) is None
    assert not (tmp_path / "new").exists()  # checked, not made


def test_generate_reads_a_png(tmp_path, capsys):
    """A PNG through PIL (a read-only pixel array) gives the same text as the array itself."""
    Image = pytest.importorskip("PIL.Image")
    tok = FlamingoTokenizer.train_bpe(["a red square left of a blue circle"] * 30, vocab_size=280)
    cfg = get_preset("tiny")
    cfg.lm.vocab_size = tok.vocab_size
    model = Flamingo(cfg)
    save_pretrained(model, tmp_path / "m", tokenizer=tok)
    img = (np.random.RandomState(0).rand(64, 64, 3) * 255).astype(np.uint8)
    Image.fromarray(img).save(tmp_path / "img.png")
    rc = cli.main(["generate", str(tmp_path / "m"), "<image>a red", "--image", str(tmp_path / "img.png"),
                   "--max-new-tokens", "4"])
    assert rc == 0
    want = Generator(model.eval(), tok).generate([img, "a red"], GenerationConfig(max_new_tokens=4))
    assert capsys.readouterr().out == want + "\n"


def test_train_without_config_or_preset_is_an_error(capsys):
    assert cli.main(["train"]) == 2
    assert "expected a CONFIG file" in capsys.readouterr().err


def test_train_preset_runs_the_recipe(tmp_path, capsys, monkeypatch):
    """`flamingo-rt train --preset toy` runs the three-stage recipe into a model folder,
    with the malloc tuning unless --default-malloc (recorded here, not applied: it is
    process-wide; tests/test_cpu_malloc.py tests it in a subprocess)."""
    from flamingo_rt.runtime import cpu_malloc

    calls = []
    monkeypatch.setattr(cpu_malloc, "keep_freed_memory", lambda: calls.append(1))
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert cli.main(["train", "--preset", "toy", "--out-dir", str(tmp_path / "m"), "--no-progress"]) == 0
    finally:
        torch.set_num_threads(n)
    assert "model folder" in capsys.readouterr().out
    assert (tmp_path / "m" / "model.safetensors").exists() and (tmp_path / "m" / "tokenizer.json").exists()
    assert calls == [1]
    assert cli.main(["train", "--preset", "nope", "--out-dir", str(tmp_path / "x"), "--default-malloc"]) == 2
    assert calls == [1]
