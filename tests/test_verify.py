"""The parity suite: `gemma-edge verify` on every tiny family x format x quantization, and proof
that it fails on a broken export, by checksum and, with the checksum check off, by the numbers."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gemma_edge.checkpoints import resolve
from gemma_edge.exporters.settings import ExportSettings
from gemma_edge.verify import THRESHOLDS

pytestmark = pytest.mark.slow  # two dozen exports

GEMMA_EDGE = str(Path(sys.executable).with_name("gemma-edge"))
FAMILIES = ["tiny-gemma", "tiny-gemma-mha", "tiny-gemma2", "tiny-gemma3"]
CASES = [(name, fmt, quant) for name in FAMILIES for fmt in ("onnx", "pte") for quant in ("fp32", "int8", "int4")]
MAX_SEQ_LEN = 64


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([GEMMA_EDGE, *args], capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def exports(tiny_exports) -> dict[tuple[str, str, str], Path]:
    return {case: tiny_exports(*case) for case in CASES}


def verify(folder: Path, tmp_path: Path, *extra: str) -> tuple[subprocess.CompletedProcess, dict]:
    """verify with --json; the reference is the manifest's source unless extra names one (a cached
    export's manifest names the temporary folder of the run that made it: pass --reference)."""
    report = tmp_path / f"{folder.name}.json"
    result = run("verify", str(folder), "--prefill", "24", "--decode", "12", "--greedy", "16", "--json", str(report), *extra)
    assert result.returncode in (0, 1), result.stderr  # a verdict, not a crash
    return result, json.loads(report.read_text())


@pytest.mark.parametrize("name, fmt, quant", CASES)
def test_every_export_verifies(name, fmt, quant, exports, tiny_with_tokenizers, tmp_path):
    result, report = verify(exports[(name, fmt, quant)], tmp_path, "--reference", str(tiny_with_tokenizers[name]))
    checks = {c["name"]: c for c in report["checks"]}
    print(f"{name} {fmt} {quant}: " + "; ".join(f"{k} max {c['max_abs']:.1e} top-1 {c['top1']:.0%} KL {c['kl']:.4f} "
                                                  f"ppl x{c['ppl_ratio']:.3f}" for k, c in checks.items())
          + f"; greedy first differs at {report['greedy']['first_divergence']}")
    assert result.returncode == 0 and report["passed"], result.stdout
    assert set(checks) == {"prefill", "decode"} and checks["prefill"]["rows"] == 24 and checks["decode"]["rows"] == 12
    assert report["checksums_ok"] is True and report["limits"] == THRESHOLDS[quant]
    if quant == "fp32":
        assert report["greedy"]["first_divergence"] is None and checks["prefill"]["max_abs"] < 1e-4


def test_a_golden_file_checks_without_the_reference(exports, tiny_with_tokenizers, tmp_path):
    folder = exports[("tiny-gemma3", "onnx", "int8")]
    golden = tmp_path / "golden.npz"
    _, live = verify(folder, tmp_path, "--save-golden", str(golden), "--reference", str(tiny_with_tokenizers["tiny-gemma3"]))
    result, saved = verify(folder, tmp_path, "--golden", str(golden))
    assert result.returncode == 0 and saved["checks"] == live["checks"] and saved["greedy"] == live["greedy"]
    other = run("verify", str(exports[("tiny-gemma", "onnx", "int8")]), "--golden", str(golden))
    assert other.returncode == 2 and "saved for another model" in other.stderr


def _perturb_onnx_weight(folder: Path) -> None:
    """Change every 7th value of one decoder weight matrix by 2% in model.onnx, in place (same size),
    as a bad copy or a bad tool would. (Scaling a whole matrix would not do: Gemma 2/3 normalize each
    sub-block's output, so o_proj * 1.01 computes exactly what o_proj does.)"""
    import onnx
    from onnx import numpy_helper

    path = folder / "model.onnx"
    model = onnx.load(str(path))
    for t in model.graph.initializer:
        if t.name.startswith("model.layers.0.") and t.data_type == onnx.TensorProto.FLOAT and len(t.dims) == 2:
            w = numpy_helper.to_array(t)
            break
    else:
        raise AssertionError("no weight to perturb")
    _scale_in_file(path, w)


def _scale_in_file(path: Path, w: np.ndarray) -> None:
    """Every 7th value of the float32 matrix w, found in the file by its bytes, made 2% larger."""
    data = bytearray(path.read_bytes())
    at = data.find(w.tobytes())
    assert at >= 0, f"the weight's bytes are not in {path.name}"
    changed = w.copy()
    changed.flat[::7] *= 1.02
    data[at:at + w.nbytes] = changed.tobytes()
    path.write_bytes(bytes(data))


def _perturb_pte_weight(data: Path, checkpoint: Path) -> None:
    """The same 2% change to every 7th value of layer 0's down projection, found in the program's
    data file by its bytes (an fp32 .pte keeps the checkpoint's [out, in] float32 weights as they are)."""
    from safetensors.numpy import load_file

    weights = {}
    for f in checkpoint.glob("*.safetensors"):
        weights.update(load_file(f))
    _scale_in_file(data, weights["model.layers.0.mlp.down_proj.weight"].astype(np.float32))


def test_a_perturbed_weight_fails_by_checksum_and_by_numbers(exports, tiny_with_tokenizers, tmp_path):
    folder = tmp_path / "broken"
    shutil.copytree(exports[("tiny-gemma3", "onnx", "fp32")], folder)
    _perturb_onnx_weight(folder)
    reference = ("--reference", str(tiny_with_tokenizers["tiny-gemma3"]))
    result, report = verify(folder, tmp_path, *reference)
    assert result.returncode == 1 and report["checksums_ok"] is False and not report["passed"]
    assert "model.onnx" in result.stderr and "FAIL" in result.stdout
    result, report = verify(folder, tmp_path, "--no-verify-checksums", *reference)
    assert result.returncode == 1 and report["checksums_ok"] is None and not report["passed"]
    assert not any(c["passed"] for c in report["checks"])  # the numbers alone catch it
    print("perturbed:", [(c["name"], f"{c['max_abs']:.1e}") for c in report["checks"]])


def test_a_wrong_rope_base_fails_by_the_numbers(tiny_with_tokenizers, tmp_path):
    """An export made with the wrong RoPE base (a config edited by hand, a converter's bug) is
    verified against the true checkpoint: its own checksums match, the numbers do not."""
    from gemma_edge.exporters.executorch import export_pte

    source = tiny_with_tokenizers["tiny-gemma2"]
    wrong = tmp_path / "wrong-theta"
    shutil.copytree(source, wrong)
    config = json.loads((wrong / "config.json").read_text())
    config["rope_parameters"]["rope_theta"] *= 10  # transformers 5 keeps the base here
    (wrong / "config.json").write_text(json.dumps(config))
    folder = tmp_path / "export"
    export_pte(resolve(wrong), ExportSettings(format="pte", quant="fp32", max_seq_len=MAX_SEQ_LEN), folder)
    result, report = verify(folder, tmp_path, "--reference", str(source))
    assert result.returncode == 1 and report["checksums_ok"] is True and not report["passed"]
    assert not all(c["passed"] for c in report["checks"]) and max(c["max_abs"] for c in report["checks"]) > 1e-2
    result, report = verify(folder, tmp_path)  # against the checkpoint it was made from: consistent
    assert result.returncode == 0 and report["passed"]


def test_verify_refuses_a_reference_of_another_shape(exports):
    result = run("verify", str(exports[("tiny-gemma", "onnx", "fp32")]), "--reference", "random:tiny-gemma3")
    assert result.returncode == 2 and "another shape" in result.stderr and "--reference" in result.stderr


def test_golden_rows_match_the_reference_directly(exports, tiny_with_tokenizers, tmp_path):
    """The golden file's logits are transformers' own: spot-check one row against a fresh forward."""
    import torch

    from gemma_edge.reference import load_reference
    from gemma_edge.verify import Golden

    golden_path = tmp_path / "g.npz"
    verify(exports[("tiny-gemma2", "onnx", "fp32")], tmp_path, "--save-golden", str(golden_path),
           "--reference", str(tiny_with_tokenizers["tiny-gemma2"]))
    golden = Golden.load(golden_path)
    reference = load_reference(str(tiny_with_tokenizers["tiny-gemma2"]))
    with torch.no_grad():
        row = reference(torch.tensor([golden.ids[:10]])).logits[0, -1].numpy()
    np.testing.assert_allclose(golden.logits[9], row, atol=1e-5, rtol=1e-5)


# The same checks on an emulated arm64 CPU (QEMU user mode): ONNX Runtime's ARM kernels in an arm64
# Python; a .pte in our native runner (gemma_edge/native/) on the executorch aarch64 wheel's runtime,
# kernels and XNNPACK delegate, driven from the host.

@pytest.mark.parametrize("fmt", ["onnx", "pte"])
@pytest.mark.parametrize("quant, cpu", [("fp32", "cortex-a76"), ("int8", "cortex-a76"), ("int4", "cortex-a76"),
                                        ("int4", "neoverse-n2")])
def test_exports_verify_on_emulated_arm64(fmt, quant, cpu, exports, tiny_exports, tiny_with_tokenizers, tmp_path):
    folder = exports[("tiny-gemma3", fmt, quant)]
    if (fmt, cpu) == ("pte", "neoverse-n2"):  # the native runner prefills 24 tokens in calls of 8 (--max-tokens-per-call)
        folder = tiny_exports("tiny-gemma3", "pte", quant, max_tokens_per_call=8)
        assert json.loads((folder / "gemma_edge.json").read_text())["io"]["tokens_per_call"] == [1, 8]
    reference = ("--reference", str(tiny_with_tokenizers["tiny-gemma3"]))
    _, host = verify(folder, tmp_path, *reference)
    result, arm = verify(folder, tmp_path, "--target", "arm64", "--cpu", cpu, *reference)
    assert result.returncode == 0 and arm["passed"] and (arm["target"], arm["cpu"]) == ("arm64", cpu), result.stdout
    assert "emulated arm64" in result.stderr and ("native ExecuTorch runner" in result.stderr) == (fmt == "pte")
    for h, a in zip(host["checks"], arm["checks"]):  # other kernels, the same model: close, not equal
        print(f"{fmt} {quant} {cpu} {a['name']}: max |diff| host {h['max_abs']:.2e} arm64 {a['max_abs']:.2e}, "
              f"KL {h['kl']:.4f} / {a['kl']:.4f}")
        assert abs(h["kl"] - a["kl"]) < 0.01 and abs(h["ppl_ratio"] - a["ppl_ratio"]) < 0.02
    if quant == "fp32":
        assert arm["greedy"]["first_divergence"] is None


def test_a_broken_pte_fails_on_arm64_by_its_numbers(exports, tiny_with_tokenizers, tmp_path):
    """The emulated run can fail too: a perturbed weight, checksums not consulted."""
    folder = tmp_path / "broken"
    shutil.copytree(exports[("tiny-gemma3", "pte", "fp32")], folder)
    _perturb_pte_weight(folder / "model.ptd", tiny_with_tokenizers["tiny-gemma3"])
    result, arm = verify(folder, tmp_path, "--target", "arm64", "--no-verify-checksums",
                         "--reference", str(tiny_with_tokenizers["tiny-gemma3"]))
    assert result.returncode == 1 and not arm["passed"] and arm["target"] == "arm64", result.stdout
    assert arm["checks"][0]["max_abs"] > 1e-2

def test_the_arm64_runner_takes_a_thread_count(exports):
    """The native runner's --threads (ExecuTorch's thread pool, sized before the program loads, as
    the Python backend's --threads): one thread computes the logits the default pool does, on the
    program and its data file; a count below 1 is refused before the runner starts."""
    from gemma_edge.emulation import arm64_command, ensure_pte_runner
    from gemma_edge.errors import GemmaEdgeError
    from gemma_edge.runtime.native_backend import NativeBackend

    folder = exports[("tiny-gemma3", "pte", "int8")]
    runner = ensure_pte_runner(progress=lambda message: None)
    prefix, env = arm64_command("cortex-a76")
    ids = list(range(2, 14))
    one = NativeBackend(folder, runner, prefix, env, threads=1).forward_last(ids, 0)
    pool = NativeBackend(folder, runner, prefix, env).forward_last(ids, 0)
    np.testing.assert_array_equal(one, pool)
    assert np.isfinite(one).all() and one.std() > 0
    with pytest.raises(GemmaEdgeError, match="at least 1"):
        NativeBackend(folder, runner, prefix, env, threads=0)


def test_the_arm64_runner_sends_a_prompt_to_the_prefill_method(tiny_exports):
    """A program with --prefill-method in the native runner (one Module, the methods' memory arenas
    shared: the KV cache; XNNPACK's weight cache: one packed copy of the weights): the runner reports
    the method, and a prompt through it, then decode steps through forward, give the logits of the
    program without it."""
    from gemma_edge.emulation import arm64_command, ensure_pte_runner
    from gemma_edge.runtime.native_backend import NativeBackend

    runner = ensure_pte_runner(progress=lambda message: None)
    prefix, env = arm64_command("cortex-a76")
    plain, folder = (tiny_exports("tiny-gemma2", "pte", "int4", **extra) for extra in ({}, {"prefill_method": True}))
    backends = [NativeBackend(f, runner, prefix, env) for f in (plain, folder)]
    assert [b.prefill_method for b in backends] == [False, True]
    ids = list(range(7, 31))  # 20 prompt tokens past the sliding layers' ring of 9 slots, 4 decode steps
    rows = [[b.forward_last(ids[:20], 0)] + [b.forward_last([t], 20 + i) for i, t in enumerate(ids[20:])] for b in backends]
    print("max |diff| per row:", [float(np.abs(a - b).max()) for a, b in zip(*rows)])
    np.testing.assert_allclose(np.stack(rows[1]), np.stack(rows[0]), rtol=0, atol=1e-5)
    assert np.isfinite(rows[0]).all() and np.std(rows[0]) > 0


def test_a_truncated_pte_is_reported_by_the_arm64_runner(exports, tiny_with_tokenizers, tmp_path):
    """A program the runtime cannot load: named as damaged with ExecuTorch's reason, as the host's
    runtimes name it, not a hang or a stack trace."""
    folder = tmp_path / "truncated"
    shutil.copytree(exports[("tiny-gemma3", "pte", "int8")], folder)
    pte = folder / "model.pte"
    pte.write_bytes(pte.read_bytes()[:4096])
    result = run("verify", str(folder), "--target", "arm64", "--no-verify-checksums",
                 "--reference", str(tiny_with_tokenizers["tiny-gemma3"]))
    assert result.returncode == 2, result.stderr
    assert f"{pte} (or its weights, model.ptd) is damaged (ExecuTorch cannot load it: Error::" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_an_export_is_judged_by_its_lowest_precision():
    from gemma_edge.verify import limits_key

    assert limits_key({"quant": "int8", "embedding_quant": "int8"}) == "int8"
    assert limits_key({"quant": "int8", "embedding_quant": "int4"}) == "int4"  # the x1.09 recipe
    assert limits_key({"quant": "fp32", "embedding_quant": "none"}) == "fp32"
    assert limits_key({"quant": "fp32", "embedding_quant": "int8"}) == "int8"
    assert limits_key({"quant": "int4"}) == "int4"  # manifests without the field
    assert limits_key({"quant": "fp32", "embedding_quant": "none", "kv_dtype": "float16"}) == "float16"
    assert limits_key({"quant": "int8", "embedding_quant": "int8", "kv_dtype": "float16"}) == "int8"
