"""--recipe gptq on tiny models: GPTQ lowers each layer's output error on the calibration activations
below round-to-nearest on the same grid, the exporters store exactly the values GPTQ chose, the
calibration text is read and recorded, and wrong settings are refused. (The exported programs
equal their eager twins in test_onnx.py / test_executorch.py, cases int4+gptq and gptq; quality on
the real 270M in test_real_calibration.py.)"""

from __future__ import annotations

import collections
import json
import shutil

import pytest
import torch
from conftest import make_checkpoint

from gemma_edge.checkpoints import iter_weights, resolve, weight_shapes
from gemma_edge.errors import ConfigError
from gemma_edge.exporters import calibration as cal
from gemma_edge.exporters.gptq import gptq
from gemma_edge.exporters.onnx_quant import BITS, CLIPS, block_grid
from gemma_edge.exporters.settings import ExportSettings
from gemma_edge.exporters.torchao_quant import int4_layer_grid

MAX_SEQ_LEN = 64
TOKENS = 2048  # 32 chunks of 64: what the tiny exports of test_onnx.py / test_executorch.py calibrate on
GRIDS = {"onnx": lambda name, w: block_grid(w, BITS["int4"], 32, CLIPS), "pte": int4_layer_grid(32)}


def _on_grid(grid, w: torch.Tensor) -> torch.Tensor:
    """w [rows, cols] rounded to nearest on grid, column by column, in float32."""
    return torch.stack([grid.round(w[:, j].float(), j) for j in range(w.shape[1])], 1)


def _layer_inputs(ckpt, layer: int = 0):
    """{linear weight name: (float32 weight, its inputs on the calibration text [tokens, in])} for
    one decoder layer of the float model, and the calibration."""
    calib = cal.calibration(ckpt, None, MAX_SEQ_LEN, TOKENS)
    weights = dict(iter_weights(ckpt))
    x = torch.nn.functional.embedding(calib.ids, weights["embed_tokens.weight"]) * ckpt.config.embedding_scale
    inputs = {}
    for i in range(layer + 1):
        prefix = f"layers.{i}."
        built = cal.build_layer(i, {n: w for n, w in weights.items() if n.startswith(prefix)}, ckpt.config, x.shape[1])
        if i == layer:
            for name, module in built.named_modules():
                if isinstance(module, torch.nn.Linear):
                    module.register_forward_pre_hook(
                        lambda m, args, name=name: inputs.setdefault(prefix + name + ".weight", []).append(args[0]))
        with torch.no_grad():
            x = cal.run_layer(built, x, ckpt.config)
    return {n: (weights[n].float(), torch.cat(xs)) for n, xs in inputs.items()}, calib


@pytest.mark.parametrize("fmt", list(GRIDS))
def test_gptq_lowers_each_layers_output_error_below_round_to_nearest(fmt, tiny_with_tokenizers):
    """On the calibration activations, every linear layer of a decoder layer (attention and MLP):
    the squared error of its output, GPTQ against rounding each weight to nearest on the same grid."""
    ckpt = resolve(tiny_with_tokenizers["tiny-gemma3"])
    layers, calib = _layer_inputs(ckpt, layer=1)
    assert calib.ids.shape == (TOKENS // MAX_SEQ_LEN, MAX_SEQ_LEN) and (calib.ids[:, 0] == 2).all()
    ratios = {}
    for name, (w, x) in layers.items():
        if fmt == "pte" and w.shape[1] % 32:
            continue  # XNNPACK's 4-bit groups: the exporter keeps such a layer at int8 (never calibrated)
        grid = GRIDS[fmt](name, w)
        nearest = _on_grid(grid, w)
        rounded = gptq(w, x.T @ x, grid)
        # both on the grid: GPTQ chose among the grid's values, it did not move off it
        torch.testing.assert_close(_on_grid(grid, rounded), rounded)
        error = lambda q: ((x @ (w - q).T) ** 2).sum().item()
        ratios[name.split(".", 2)[2]] = error(rounded) / error(nearest)
    print(fmt, {k: f"{v:.2f}" for k, v in ratios.items()})
    # measured (tiny-gemma3, layer 1): onnx 0.20-0.67, pte 0.20-0.52 of round-to-nearest's error
    assert max(ratios.values()) < 0.85 and len(ratios) == {"onnx": 7, "pte": 6}[fmt]


@pytest.mark.parametrize("cols, wide", [(96, 2048), (96, 32), (97, 32)])
def test_gptq_factors_the_hessian_in_its_own_storage(cols, wide):
    """gptq.factor: the column order (Hessian diagonal, largest first) and the upper Cholesky factor of
    the damped, permuted Hessian's inverse, computed in the Hessian's own storage (Gemma 7B's
    down_proj: no second 2.4 GB matrix), equal to the plain computation by either route (wider than
    `wide`: one factorization of the reversed Hessian and a triangular inverse, reflected across the
    anti-diagonal); a column no input reached is given weight 1 (rounded to nearest)."""
    from gemma_edge.exporters.gptq import DAMPING, factor

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(300, cols, generator=gen) * torch.rand(cols, generator=gen)
    x[:, 5] = 0  # a dead column
    h = (x.T @ x).double()
    h[5, 5] = 1.0
    order = torch.argsort(h.diagonal(), descending=True, stable=True)
    p = h[order][:, order]
    p.diagonal().add_(DAMPING * p.diagonal().mean())
    expected = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(p)), upper=True)
    given = (x.T @ x).clone()
    f = factor(given, wide=wide)
    assert f.inverse.data_ptr() == given.data_ptr() and torch.equal(f.order, order)
    torch.testing.assert_close(f.inverse.double(), expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("n", [7, 10])
def test_reflect_in_place_mirrors_a_matrix_across_its_anti_diagonal(n):
    """gptq.reflect_in_place (the wide factor's last step): m[i, j] = m[n-1-j, n-1-i] before, for an odd
    and an even middle, with blocks of 3 (pairs of blocks, and blocks that are their own image)."""
    from gemma_edge.exporters.gptq import reflect_in_place

    m = torch.arange(n * n, dtype=torch.float32).reshape(n, n)
    reflected = m.T.flip(0, 1)
    reflect_in_place(m, block=3)
    assert torch.equal(m, reflected)


def test_wide_hessians_are_summed_above_the_diagonal_and_mirrored():
    """gptq.add_gram: a Hessian wider than its block sums only the blocks on and above the diagonal
    (half the products at full size), and mirrored() completes it to x^T x over every chunk; one at
    most a block wide is the one product it always was, bit for bit (the real 270M's are at most
    2048 wide: its calibrated weights are unchanged)."""
    from gemma_edge.exporters.gptq import add_gram, mirrored

    gen = torch.Generator().manual_seed(0)
    chunks = [torch.randn(50, 200, generator=gen) for _ in range(3)]
    wide = torch.zeros(200, 200)
    for x in chunks:
        add_gram(wide, x, block=64)
    assert torch.count_nonzero(wide[64:, :64]) == 0  # below the diagonal blocks: not summed
    full = sum(x.T.double() @ x.double() for x in chunks)
    torch.testing.assert_close(mirrored(wide, block=64).double(), full, rtol=1e-5, atol=1e-4)

    narrow, plain = torch.zeros(200, 200), torch.zeros(200, 200)
    for x in chunks:
        add_gram(narrow, x, block=200)
        plain.addmm_(x.T, x)
    assert torch.equal(mirrored(narrow, block=200), plain)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("fmt", list(GRIDS))
def test_the_exporter_stores_exactly_what_gptq_rounded(fmt, dtype, tiny_with_tokenizers, tmp_path):
    """The exporter's quantized layers hold GPTQ's values: each calibrated weight (the 4-bit layers,
    and the tied table the head reads), as the exported layer dequantizes it, equals the calibrated
    stream's weight (to float rounding). From a bf16 checkpoint the stream's table stays in bf16
    (calibrate_head), and the exporter's rounding finds GPTQ's grid points from it."""
    folder = tiny_with_tokenizers["tiny-gemma3"]
    if dtype == "bfloat16":
        folder = make_checkpoint("tiny-gemma3", tmp_path / "bf16", dtype=torch.bfloat16)
        shutil.copy(tiny_with_tokenizers["tiny-gemma3"] / "tokenizer.json", folder)
    ckpt = resolve(folder)
    settings = ExportSettings(format=fmt, quant="int4", max_seq_len=MAX_SEQ_LEN, recipe="gptq", calibration_tokens=TOKENS)
    calib = cal.calibration(ckpt, None, MAX_SEQ_LEN, TOKENS)
    names = {n for n in cal.linear_weights(ckpt.config)  # the layers at int4 (not k, v: 8-bit; .pte: XNNPACK's 4-bit groups)
             if settings.layer_quant(n) == "int4" and (fmt == "onnx" or dict(weight_shapes(ckpt.config))[n][1] % 32 == 0)}
    names |= {"embed_tokens.weight"}
    grids = {}
    # a 4-bit table keeps 8-bit copies of its hot rows, which GPTQ leaves out (HotRowsTable, pte_hot_rows.py)
    hot = cal.hot_tokens(ckpt, None, settings.hot_rows())[0]
    assert len(hot) == ckpt.config.vocab_size // 16
    rounded = {n: w for n, w in cal.calibrated_weights(iter_weights(ckpt), ckpt.config, calib.ids, names, GRIDS[fmt], grids,
                                                       keep=hot) if n in names}
    assert rounded["embed_tokens.weight"].dtype == getattr(torch, dtype)
    if dtype == "bfloat16":  # GPTQ's grid points, from the bf16 values the stream holds
        rounded["embed_tokens.weight"] = _on_grid(grids["embed_tokens.weight"], rounded["embed_tokens.weight"])
    stored = _stored_weights(fmt, ckpt, settings)
    assert set(stored) == names == set(rounded)
    plain = dict(iter_weights(ckpt))
    cold = torch.ones(ckpt.config.vocab_size, dtype=torch.bool)
    cold[hot] = False
    for name in names:
        rows = cold if name == "embed_tokens.weight" else slice(None)
        torch.testing.assert_close(stored[name][rows], rounded[name][rows], atol=1e-6, rtol=1e-5)
        assert not torch.allclose(rounded[name][rows], plain[name][rows].float(), atol=1e-3)  # and they were rounded
    # the hot rows: the checkpoint's values at 8 bits, to within half a step: ONNX's blocks of 32 span
    # their range (with 0) in 255 steps, the .pte's rows are symmetric, max |w| in 127.5 steps
    table = plain["embed_tokens.weight"][hot].float().view(len(hot), -1, 32)
    steps = ((table.amax(-1).clamp(min=0) - table.amin(-1).clamp(max=0)) / 255 if fmt == "onnx"
             else table.abs().amax((1, 2))[:, None].expand(table.shape[:2]) / 127.5)
    error = (stored["embed_tokens.weight"][hot] - table.flatten(1)).abs().view(table.shape)
    assert (error <= steps[..., None] / 2 + 1e-6).all()


def _products(monkeypatch) -> list[collections.Counter]:
    """Each layer cal.build_layer builds from now on: how many products each of its linear layers
    computed (completed forwards: a forward stopped before its product is not one)."""
    counts = []
    build = cal.build_layer

    def counted(*args, **kwargs):
        layer = build(*args, **kwargs)
        counts.append(collections.Counter())
        for name, module in layer.named_modules():
            if isinstance(module, torch.nn.Linear):
                module.register_forward_hook(lambda m, a, o, name=name, c=counts[-1]: c.update([name.split(".")[-1]]))
        return layer

    monkeypatch.setattr(cal, "build_layer", counted)
    return counts


def test_the_table_alone_is_calibrated_on_the_float_models_final_norm_running_each_layer_once(tiny_with_tokenizers,
                                                                                             monkeypatch):
    """The phone recipe calibrates the table only: each decoder layer then runs once over the
    calibration chunks (no Hessians to gather before its output); with 4-bit linears it runs once
    too, gate's and up's products twice (test_each_linear_is_calibrated_on_its_input_in_the_calibrated_layer);
    the table is GPTQ's on the float model's final-norm outputs (Gemma's own stack, each chunk from
    position 0), the layers' weights pass unchanged."""
    from gemma_edge.checkpoints import load_model

    ckpt = resolve(tiny_with_tokenizers["tiny-gemma3"])
    calib = cal.calibration(ckpt, None, MAX_SEQ_LEN, TOKENS)
    chunks, layers = calib.ids.shape[0], ckpt.config.num_hidden_layers
    products = _products(monkeypatch)
    table_only = dict(cal.calibrated_weights(iter_weights(ckpt), ckpt.config, calib.ids, {"embed_tokens.weight"},
                                             GRIDS["onnx"], {}))
    once = {"q_proj": chunks, "k_proj": chunks, "v_proj": chunks, "o_proj": chunks, "gate_proj": chunks,
            "up_proj": chunks, "down_proj": chunks}
    assert products == [once] * layers  # each layer's output, no Hessians gathered
    plain = dict(iter_weights(ckpt))
    assert all(torch.equal(table_only[n], w) for n, w in plain.items() if n != "embed_tokens.weight")

    model = load_model(ckpt, MAX_SEQ_LEN)
    with torch.no_grad():
        outputs = []
        for chunk in calib.ids:
            model.reset_cache()
            outputs.append(model.norm(model.hidden_states(chunk[None], torch.arange(len(chunk))))[0])
    x = torch.cat(outputs)
    table = plain["embed_tokens.weight"].float()
    expected = gptq(table, x.T @ x, GRIDS["onnx"]("embed_tokens.weight", table))
    torch.testing.assert_close(table_only["embed_tokens.weight"], expected)
    assert not torch.allclose(expected, table, atol=1e-3)

    products.clear()
    list(cal.calibrated_weights(iter_weights(ckpt), ckpt.config, calib.ids, cal.linear_weights(ckpt.config),
                                GRIDS["onnx"], {}))
    # the layer once, and gate's and up's products again for down's input (not held for all the chunks)
    assert products == [{**once, "gate_proj": 2 * chunks, "up_proj": 2 * chunks}] * layers


class _Unrounded:
    """A grid that rounds nothing (gptq.Grid): GPTQ then returns the weight as it is."""

    def round(self, w: torch.Tensor, col: int) -> torch.Tensor:
        return w


@pytest.mark.parametrize("variant", ["tiny-gemma", "tiny-gemma3"])
def test_each_linear_is_calibrated_on_its_input_in_the_calibrated_layer(variant, tiny_with_tokenizers, monkeypatch):
    """True-sequential GPTQ: the Hessian each group of linears (q, k, v; o; gate, up; down) is rounded
    on is the sum of x x^T over its input as the layer with its calibrated weights computes it (the
    linears before it already rounded); the layer's output is the calibrated layer's; with a grid that
    rounds nothing, it is the plain layer's, bit for bit (Gemma 1 without the post-norms, Gemma 3
    with them). Each Hessian is made once for all the chunks."""
    ckpt = resolve(tiny_with_tokenizers[variant])
    calib = cal.calibration(ckpt, None, MAX_SEQ_LEN, TOKENS)
    weights = dict(iter_weights(ckpt))
    x = cal.embed_chunks(calib.ids, weights["embed_tokens.weight"], ckpt.config)
    tensors = {n: w for n, w in weights.items() if n.startswith("layers.0.")}
    names = {n for n in tensors if n.endswith("_proj.weight")}
    hessians = []
    made = cal.factor
    monkeypatch.setattr(cal, "factor", lambda h: hessians.append(h.clone()) or made(h))

    def copies() -> dict[str, torch.Tensor]:  # calibrate_layer rounds a float32 weight in its own storage
        return {n: w.clone() for n, w in tensors.items()}

    plain = cal.run_layer(cal.build_layer(0, copies(), ckpt.config, x.shape[1]), x, ckpt.config)
    unrounded, out = cal.calibrate_layer(0, copies(), x.clone(), ckpt.config, names, lambda n, w: _Unrounded(), {})
    assert torch.equal(out, plain)
    assert all(torch.equal(unrounded[n], tensors[n].float()) for n in names)

    hessians.clear()
    summed = []  # the Hessian each chunk's input was added to (held: their ids stay theirs)
    add = cal.add_gram
    monkeypatch.setattr(cal, "add_gram", lambda h, chunk: summed.append(h) or add(h, chunk))
    rounded, out = cal.calibrate_layer(0, copies(), x.clone(), ckpt.config, names, GRIDS["onnx"], {})
    inputs = {}
    layer = cal.build_layer(0, {**tensors, **rounded}, ckpt.config, x.shape[1])
    for name, module in layer.named_modules():
        if isinstance(module, torch.nn.Linear):
            module.register_forward_pre_hook(lambda m, args, name=name: inputs.setdefault(name, []).append(args[0]))
    with torch.no_grad():
        assert torch.equal(out, cal.run_layer(layer, x, ckpt.config))  # the same ops in the same order
    assert all(not torch.allclose(rounded[n], tensors[n].float(), atol=1e-3) for n in names)
    assert len(hessians) == 4
    for hessian, group in zip(hessians, (["attn.q_proj", "attn.k_proj", "attn.v_proj"], ["attn.o_proj"],
                                         ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"])):
        for name in group:
            read = torch.cat(inputs[name])
            torch.testing.assert_close(hessian, read.T @ read, rtol=1e-4, atol=1e-4)
    # one Hessian per group for all the chunks, not one per chunk (a [cols, cols] of zeros each: 2.4 GB at
    # Gemma 7B's down_proj)
    assert x.shape[0] == 32 and collections.Counter(map(id, summed)) == {id(h): 32 for h in dict.fromkeys(summed)}
    assert len(set(map(id, summed))) == 4


@pytest.mark.parametrize("fmt", list(GRIDS))
def test_a_bf16_table_is_calibrated_in_place_on_gptqs_grid_points(fmt):
    """calibrate_head writes GPTQ's rows back into the table it is given, in the table's dtype: a bf16
    table's values then round back onto exactly the grid points GPTQ chose (in float32). A group
    whose values lie far from zero against its range cannot be held so in bf16 when its grid has an
    offset (.pte): the result then moves to float32, GPTQ's values exactly from there on. ONNX's grids reach
    zero, so the same table stays in bf16."""
    gen = torch.Generator().manual_seed(0)
    table = (torch.randn(96, 64, generator=gen) * 0.02)
    table[70, :32] = 1.0 + 0.01 * torch.randn(32, generator=gen)  # one narrow group around 1.0
    table = table.bfloat16()
    x = torch.randn(2, 48, 64, generator=gen)
    expected = cal.calibrate_head("embed_tokens.weight", table.float(), x, GRIDS[fmt], {}, rows=32)
    grids, given = {}, table.clone()
    out = cal.calibrate_head("embed_tokens.weight", given, x, GRIDS[fmt], grids, rows=32)
    grid = grids["embed_tokens.weight"]
    snapped = _on_grid(grid, out)
    assert torch.equal(snapped, expected) and not torch.equal(expected, table.float())
    if fmt == "onnx":
        assert out.dtype == torch.bfloat16 and out.data_ptr() == given.data_ptr()  # in place: no float32 copy
    else:
        # from the narrow group's block of rows on, float32: GPTQ's values as they are (the blocks
        # before it were held in bf16, which the check above rounds back onto the same points)
        assert out.dtype == torch.float32 and torch.equal(out[64:], expected[64:])
        # without the narrow group, the .pte's table stays in bf16 too
        table[70, :32] = table[71, :32]
        out = cal.calibrate_head("embed_tokens.weight", table.clone(), x, GRIDS[fmt], grids, rows=32)
        assert out.dtype == torch.bfloat16


def _stored_weights(fmt: str, ckpt, settings) -> dict[str, torch.Tensor]:
    if fmt == "onnx":
        from gemma_edge.exporters.onnx import build_model
        from gemma_edge.exporters.onnx_contrib import unfuse_weights
        from gemma_edge.exporters.onnx_quant import dequantized_weights

        model, _ = build_model(ckpt, settings, "auto")
        weights = unfuse_weights(dequantized_weights(model), ckpt.config)
        return {n: w for n, w in weights.items()  # the 4-bit ones
                if (n.startswith("layers.") and settings.layer_quant(n) == "int4") or n == "embed_tokens.weight"}
    from gemma_edge.exporters.executorch import build_model
    from gemma_edge.exporters.int4_offsets import OffsetEmbedding, OffsetLinear

    def stored(m: OffsetLinear | OffsetEmbedding) -> torch.Tensor:
        # s * q in float32 (a table's lookup rounds it to its scales' bf16, as the device's kernel
        # does; the head reading the table computes in float32), plus the offsets
        w = m.weight
        values = w.qdata.float() * w.scale.float().repeat_interleave(m.group_size, 1)
        return values + m.offsets.weight.dequantize().repeat_interleave(m.group_size, 1)

    model, _ = build_model(ckpt, settings)
    out = {f"{n}.weight": stored(m) for n, m in model.named_modules() if isinstance(m, OffsetLinear) and n.startswith("layers.")}
    table = model.embed_tokens  # the 4-bit table, its hot rows read from their 8-bit copies (pte_hot_rows.py)
    out["embed_tokens.weight"] = stored(table.table).index_copy(0, model.lm_head.hot_ids, table.hot.weight.dequantize())
    return out


def test_calibration_text_files_and_the_default(tmp_path, tiny_with_tokenizers):
    ckpt = resolve(tiny_with_tokenizers["tiny-gemma3"])
    default = cal.calibration(ckpt, None, MAX_SEQ_LEN, TOKENS)
    import pydoc_data.topics  # what verify and the tests evaluate on: never in the default text

    text = cal.default_text()
    assert not any(t[:200] in text for t in pydoc_data.topics.topics.values() if len(t) > 200)
    assert default.sha256 == __import__("hashlib").sha256(text.encode()).hexdigest()
    lines = tmp_path / "dolly.jsonl"
    lines.write_text("\n".join(json.dumps({"instruction": f"Say {i}.", "context": "", "response": f"{i} " * 40})
                               for i in range(40)) + "\n")
    got = cal.calibration(ckpt, str(lines), MAX_SEQ_LEN, tokens=4 * MAX_SEQ_LEN)
    assert got.ids.shape == (4, MAX_SEQ_LEN) and got.source == str(lines) and got.sha256 != default.sha256
    assert "Instruction:\nSay 3.\n\nResponse:\n3 3 " in cal.read_text(lines)  # the fine-tune's prompt format
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\nnot json\n')
    with pytest.raises(ConfigError, match=r"bad.jsonl:2: not a JSON object"):
        cal.calibration(ckpt, str(bad), MAX_SEQ_LEN, TOKENS)
    short = tmp_path / "short.txt"
    short.write_text("too short")
    with pytest.raises(ConfigError, match="calibration needs at least 63"):
        cal.calibration(ckpt, str(short), MAX_SEQ_LEN, TOKENS)


def test_recipes_are_checked():
    with pytest.raises(ConfigError, match="unknown recipe 'awq'; valid: auto, rtn, gptq"):
        ExportSettings(format="onnx", recipe="awq")
    with pytest.raises(ConfigError, match="--recipe gptq calibrates 4-bit weights"):
        ExportSettings(format="pte", quant="int8", recipe="gptq")  # int8 throughout: nothing to calibrate
    ExportSettings(format="pte", quant="int8", embedding_quant="int4", recipe="gptq")  # the int4 table
    # --calibration wherever something reads the text: GPTQ, the 4-bit table's hot rows, a .pte's smoothing
    with pytest.raises(ConfigError, match="with --recipe rtn, --hot-tokens 0 and --smooth 0 nothing reads the text; use --recipe gptq"):
        ExportSettings(format="pte", recipe="rtn", hot_tokens=0, smooth=0, calibration="text.txt")
    with pytest.raises(ConfigError, match="with --recipe rtn, --hot-tokens 0 nothing reads the text"):
        ExportSettings(format="onnx", recipe="rtn", hot_tokens=0, calibration="text.txt")
    assert ExportSettings(format="pte", recipe="rtn", hot_tokens=0, calibration="t.txt").reads_calibration()  # smoothing
    with pytest.raises(ConfigError, match="--format onnx --quant int8 --embedding-quant int8 reads no text"):
        ExportSettings(format="onnx", quant="int8", calibration="text.txt")
    for reads in (ExportSettings(format="onnx", recipe="rtn", calibration="t.txt"),  # the table's hot rows
                  ExportSettings(format="pte", quant="int8", embedding_quant="int4", recipe="rtn", calibration="t.txt"),
                  ExportSettings(format="pte", quant="int8", calibration="t.txt")):  # the smoothing alone
        assert reads.reads_calibration()
    assert not ExportSettings(format="onnx", quant="int8").reads_calibration()


def test_auto_takes_the_best_measured_recipe_where_calibration_costs_minutes():
    """--recipe auto (the default), resolved for a model (benchmarks/QUALITY.md's rows): GPTQ for 4-bit
    layers and for ONNX's 4-bit table under int8 layers, rounding to nearest for a .pte's table under
    int8 layers (the head's columns corrected), nothing to calibrate without 4-bit weights; a
    calibration text calibrates 4-bit weights at any size (and leaves the .pte phone recipe's rounding
    as measured best: it chooses its hot rows); from Gemma 3 1B up, rounding to nearest unless asked
    (calibration takes tens of minutes there)."""
    from gemma_edge.config import variant
    from gemma_edge.exporters.settings import best_recipe

    small, one_b, large = variant("gemma-3-270m"), variant("gemma-3-1b"), variant("gemma-2b")

    def pick(config, **settings) -> str:
        return ExportSettings(**settings).for_model(config).recipe

    assert ExportSettings(format="onnx").recipe == "auto"  # until the model is known
    assert pick(small, format="onnx") == pick(small, format="pte") == "gptq"
    for hot in (None, 0):  # with the hot rows (8-bit) and without
        assert pick(small, format="onnx", quant="int8", embedding_quant="int4", hot_tokens=hot) == "gptq"
        assert pick(small, format="onnx", quant="int8", embedding_quant="int4", hot_tokens=hot, calibration="t.txt") == "gptq"
    assert pick(small, format="pte", quant="int8", embedding_quant="int4") == "rtn"
    # a text of the user's keeps the .pte phone recipe's best measured rounding: it chooses its hot rows (and smoothing)
    assert pick(small, format="pte", quant="int8", embedding_quant="int4", calibration="t.txt") == "rtn"
    assert "--calibration's rows of the table 8-bit" in best_recipe(
        ExportSettings(format="pte", quant="int8", embedding_quant="int4", calibration="t.txt"), small)[1]
    assert pick(small, format="onnx", quant="int8") == pick(small, format="pte", quant="fp32") == "rtn"
    for config in (one_b, large):
        assert pick(config, format="onnx") == pick(config, format="pte") == "rtn"
        assert pick(config, format="onnx", calibration="t.txt") == pick(config, format="pte", recipe="gptq") == "gptq"
    assert pick(small, format="onnx", recipe="rtn") == "rtn"  # asked for: kept
    why = best_recipe(ExportSettings(format="onnx"), large)[1]
    assert "at 2.0 B weights in its layers" in why and "--recipe gptq calibrates" in why
    assert "smoothed" not in why  # ONNX's layers quantize their inputs per block: nothing smoothed
    # a .pte's inputs smoothed where its layers are rounded to nearest (settings.smoothing): the line says so
    assert "the layers' inputs smoothed on the calibration text" in best_recipe(ExportSettings(format="pte"), large)[1]
    assert "smoothed" not in best_recipe(ExportSettings(format="pte", smooth=0), large)[1]
    phone = dict(format="pte", quant="int8", embedding_quant="int4")
    assert "the int8 layers' inputs smoothed on the calibration text" in best_recipe(ExportSettings(**phone), small)[1]
    assert "inputs smoothed on --calibration" in best_recipe(ExportSettings(**phone, calibration="t.txt"), small)[1]
    assert "smoothed" not in best_recipe(ExportSettings(**phone, smooth=0), small)[1]


def test_the_manifest_records_the_recipe_and_its_text(tiny_exports):
    """The shared tiny exports (test_onnx / test_executorch cases): the recipe, its settings, the
    calibration text's SHA-256."""
    for fmt in ("onnx", "pte"):
        folder = tiny_exports("tiny-gemma3", fmt, "int4", recipe="gptq", calibration_tokens=TOKENS)
        manifest = json.loads((folder / "gemma_edge.json").read_text())
        recipe = manifest["quantization"]["recipe"]
        assert manifest["export"]["recipe"] == "gptq" and recipe["name"] == "gptq"
        assert recipe["calibration"]["sha256"] == __import__("hashlib").sha256(cal.default_text().encode()).hexdigest()
        assert recipe["calibration"]["chunks"] * recipe["calibration"]["tokens_per_chunk"] == TOKENS
        rtn = json.loads((tiny_exports("tiny-gemma3", fmt, "int4") / "gemma_edge.json").read_text())
        assert rtn["quantization"]["recipe"] == {"name": "rtn"}
        if fmt == "pte":  # GPTQ's table needs no correction of the head's worst columns (executorch.build_model)
            assert "head_correction" in rtn["quantization"] and "head_correction" not in manifest["quantization"]


def test_rows_kept_out_of_the_tables_gptq_are_left_as_they_are():
    """A hot-rows table's 8-bit rows (onnx_quant.HotRowsTable) are not rounded to the 4-bit grid by
    the table's GPTQ: those rows come back as they went in (bf16, in place), and every other row as
    without them (rows are independent given the Hessian)."""
    gen = torch.Generator().manual_seed(1)
    table = (torch.randn(96, 64, generator=gen) * 0.02).bfloat16()
    x = torch.randn(2, 48, 64, generator=gen)
    keep = torch.tensor([3, 40, 95])
    plain = cal.calibrate_head("embed_tokens.weight", table.clone(), x, GRIDS["onnx"], {}, rows=32)
    kept = cal.calibrate_head("embed_tokens.weight", table.clone(), x, GRIDS["onnx"], {}, rows=32, keep=keep)
    assert kept.dtype == torch.bfloat16
    others = torch.ones(96, dtype=torch.bool)
    others[keep] = False
    assert torch.equal(kept[keep], table[keep]) and not torch.equal(plain[keep], table[keep])
    assert torch.equal(kept[others], plain[others])


def test_an_export_loads_the_tokenizer_once_for_the_calibration_text(tiny_with_tokenizers, tmp_path, monkeypatch):
    """The special tokens and the text's ids are asked for by the hot rows, the smoothing and GPTQ's
    chunks (Gemma 3's tokenizer.json takes ~2 s to load): each is loaded once while the files stay
    as they are, and again when a file changes."""
    import tokenizers

    from gemma_edge.exporters.manifest import special_tokens

    folder = tmp_path / "ckpt"
    shutil.copytree(tiny_with_tokenizers["tiny-gemma3"], folder)  # files of this test's own
    ckpt = resolve(folder)
    loads = []
    from_file = tokenizers.Tokenizer.from_file
    monkeypatch.setattr(tokenizers.Tokenizer, "from_file", lambda path: loads.append(path) or from_file(path))
    text = tmp_path / "text.txt"
    text.write_text("the cat sat on the mat")
    first = [special_tokens(ckpt), cal.text_ids(ckpt, str(text))]
    assert loads and [special_tokens(ckpt), cal.text_ids(ckpt, str(text))] == first
    assert cal.hot_tokens(ckpt, str(text), 16384)[1]["rows"] > 0 and cal.calibration(ckpt, str(text), 64, 8).ids.shape[0] > 0
    assert len(loads) == 2  # the end-of-turn id's lookup, the text's encoding
    text.write_text("a dog ran past a dog")
    ids, _, sha256 = cal.text_ids(ckpt, str(text))
    assert ids != first[1][0] and sha256 != first[1][2] and len(loads) == 3  # the new text encoded
    config = folder / "tokenizer.json"
    config.write_text(config.read_text() + "\n")  # the tokenizer changed: both read it again
    assert cal.text_ids(ckpt, str(text))[0] == ids and len(loads) == 5


def test_hot_tokens_are_the_calibration_texts_most_frequent(tiny_with_tokenizers, tmp_path):
    """The hot rows: the special tokens, then the text's tokens by frequency, at most a sixteenth of
    the vocabulary; none for a checkpoint without a tokenizer (random weights); --hot-tokens only
    where there is a 4-bit table."""
    ckpt = resolve(tiny_with_tokenizers["tiny-gemma3"])
    text = tmp_path / "text.txt"
    text.write_text("the the the cat cat sat")
    from gemma_edge.exporters.manifest import special_tokens

    special = special_tokens(ckpt)
    marks = {special["bos_token_id"], *special["stop_token_ids"]}  # <bos>, <eos>, <end_of_turn>
    rows, record = cal.hot_tokens(ckpt, str(text), 16384)
    ids, _, _ = cal.text_ids(ckpt, str(text))
    vocab = ckpt.config.vocab_size
    assert record["limit"] == vocab // 16 and record["rows"] == len(rows) and record["text"] == str(text)
    assert set(rows.tolist()) == marks | set(ids) and len(marks | set(ids)) < vocab // 16
    rows, _ = cal.hot_tokens(ckpt, None, len(marks) + 3)  # the default text: its 3 most frequent beside the marks
    default, _, _ = cal.text_ids(ckpt, None)
    counts = torch.bincount(torch.tensor(default), minlength=vocab)
    top = [t for t in torch.argsort(-counts, stable=True).tolist() if t not in marks][:3]
    assert sorted(rows.tolist()) == rows.tolist() and set(rows.tolist()) == marks | set(top)
    assert cal.hot_tokens(resolve(make_checkpoint("tiny-gemma3", tmp_path / "bare")), None, 16384) is None
    assert ExportSettings(format="onnx", quant="int4").hot_rows() == 16384 == ExportSettings(format="pte").hot_rows()
    assert ExportSettings(format="onnx", quant="int8", embedding_quant="int4").hot_rows() == 16384
    assert ExportSettings(format="onnx", quant="int8").hot_rows() == 0 == ExportSettings(format="pte", quant="int8").hot_rows()
    import dataclasses  # a default follows the settings it is replaced into, as a given value does not

    assert dataclasses.replace(ExportSettings(format="pte"), embedding_quant="int8").hot_rows() == 0
    with pytest.raises(ConfigError, match="--hot-tokens keeps rows of a 4-bit table at 8 bits; --embedding-quant int8"):
        ExportSettings(format="pte", quant="int8", hot_tokens=100)
    with pytest.raises(ConfigError, match="--hot-tokens must be 0 or more"):
        ExportSettings(format="onnx", hot_tokens=-1)
