"""The gemma-edge command, run through its installed entry point."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

GEMMA_EDGE = str(Path(sys.executable).with_name("gemma-edge"))


def run(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([GEMMA_EDGE, *args], capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("verb", [[], ["check"], ["variants"]])
def test_help(verb):
    result = run(*verb, "--help")
    assert result.returncode == 0
    assert "usage: gemma-edge" in result.stdout


def test_no_verb_is_a_usage_error():
    result = run()
    assert result.returncode == 2 and "usage:" in result.stderr


def test_variants_lists_published_shapes():
    result = run("variants")
    assert result.returncode == 0
    for name in ("gemma-2b", "gemma-7b", "gemma-2-2b", "gemma-3-270m", "gemma-3-1b", "tiny-gemma3"):
        assert name in result.stdout
    assert "8,537.7M" in result.stdout  # Gemma 7B with embeddings


def test_check_passes_on_a_tiny_checkpoint(tiny_checkpoints, tmp_path):
    report = tmp_path / "report.json"
    result = run("check", str(tiny_checkpoints["tiny-gemma2"]), "--max-seq-len", "64", "--new-tokens", "16",
                 "--json", str(report))
    assert result.returncode == 0, result.stderr
    assert "identical" in result.stdout and "FAIL" not in result.stdout
    data = json.loads(report.read_text())
    assert data["passed"] and data["greedy_ours"] == data["greedy_reference"] and len(data["greedy_ours"]) == 16
    assert data["prefill_max_abs"] < 1e-4 and data["decode_max_abs"] < 1e-4


def test_check_random_variant():
    result = run("check", "random:tiny-gemma", "--max-seq-len", "64")
    assert result.returncode == 0, result.stderr
    assert "identical" in result.stdout


@pytest.mark.parametrize("args, message", [
    (["check", "/no/such/folder"], "no such file or folder"),
    (["check", "random:gemma-13b"], "unknown variant 'gemma-13b'"),
    (["check", "random:tiny-gemma", "--max-seq-len", "0"], "max_seq_len must be a positive integer"),
    (["check", "random:tiny-gemma", "--max-seq-len", "100000"], "exceeds the model's context"),
    (["check", "random:tiny-gemma", "--max-seq-len", "20"], "exceed --max-seq-len 20"),
    (["export", "random:tiny-gemma", "--recipe", "gptq", "--calibration", "/no/such.txt", "-o", "/tmp/never-made"],
     "--calibration /no/such.txt: no such file"),
    (["export", "random:tiny-gemma", "--recipe", "gptq", "--quant", "int8", "-o", "/tmp/never-made"],
     "--recipe gptq calibrates 4-bit weights"),
])
def test_bad_input_is_one_line_and_exit_2(args, message):
    result = run(*args)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("gemma-edge: error:")]
    assert len(lines) == 1 and message in lines[0], result.stderr


def test_llama_folder_exit_2(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    result = run("check", str(tmp_path))
    assert result.returncode == 2 and "'llama' is not supported" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_check_the_built_in_real_model(tmp_path):
    """The README's main job at this stage: the real Gemma 3 270M, end to end."""
    report = tmp_path / "report.json"
    result = run("check", "--json", str(report), timeout=900)
    assert result.returncode == 0, result.stderr
    assert "largest city in France" in result.stdout  # the greedy continuation is printed
    assert json.loads(report.read_text())["passed"]


def test_version_names_the_libraries(capsys):
    from gemma_edge.cli import main

    with pytest.raises(SystemExit) as exit:
        main(["--version"])
    out = capsys.readouterr().out
    assert exit.value.code == 0 and out.startswith("gemma-edge 0.1.0 (torch 2.13.0")
    assert all(f"{name} " in out for name in ("executorch", "onnxruntime", "transformers"))


@pytest.mark.slow
def test_our_lines_only_unless_verbose(tiny_exports, tiny_with_tokenizers):
    """generate and verify of a .pte (torch, torchao and ExecuTorch loaded: the noisiest libraries)
    print our lines only; --verbose shows what the filter hides (so the check can fail). Exports
    through the command line are checked in test_executorch.py and test_onnx.py."""
    from conftest import not_ours

    folder = str(tiny_exports("tiny-gemma3", "pte", "int4"))
    # a cached export's manifest names the temporary folder of the run that made it: name the reference
    reference = ("--reference", str(tiny_with_tokenizers["tiny-gemma3"]))
    generated = run("generate", folder, "the cat", "-n", "4")
    assert generated.returncode == 0 and "finish: length" in generated.stderr
    assert not_ours(generated.stderr) == []
    verified = run("verify", folder, *reference, "--prefill", "16", "--decode", "4", "--greedy", "4")
    assert verified.returncode == 0 and not_ours(verified.stderr) == [], verified.stderr
    verbose = run("--verbose", "verify", folder, *reference, "--prefill", "16", "--decode", "4", "--greedy", "4")
    assert verbose.returncode == 0 and any("torchao" in line or "torch/" in line for line in not_ours(verbose.stderr)), verbose.stderr


def test_a_library_s_error_log_is_hidden_unless_verbose(capsys, monkeypatch):
    """torch logs an ERROR with a traceback when Ctrl-C cuts its fake-tensor dispatch in a trace (found
    by benchmarks/interrupts.py), then the export ends as interrupted: that log is not ours."""
    import logging

    from gemma_edge import cli

    library = logging.getLogger("a.library")
    monkeypatch.setattr(library, "propagate", False)
    monkeypatch.setattr(library, "handlers", [logging.StreamHandler(sys.stderr)])  # capsys's stderr

    def verb(args):
        library.error("fake tensor raised TypeError")
        return 0
    monkeypatch.setattr(cli, "_variants", verb)
    assert cli.main(["variants"]) == 0 and capsys.readouterr().err == ""
    assert cli.main(["--verbose", "variants"]) == 0 and capsys.readouterr().err == "fake tensor raised TypeError\n"
