"""Calibrated 4-bit weights (--recipe gptq): the checkpoint's weight stream, with each decoder layer's
4-bit linear weights rounded by GPTQ (gptq.py) on the exporter's own grid, one layer at a time, and
then the 4-bit output projection (the tied table the head reads):

    x = embed(calibration ids)                       # [chunks, tokens, hidden], float32
    for each decoder layer, as the stream reaches it (true-sequential, calibrate_layer):
        for each group of linears reading one input, in forward order (q, k, v; o; gate, up; down):
            H = sum of x x^T over the group's input  # the layer's forward over the chunks up to it,
                                                     # with the groups before it already rounded
            W' = gptq(W, H, grid chosen by the exporter from W); yield W'
        x = the layer's output with W'               # what the next layer will see on the device
    table' = gptq(table, H of final_norm(x), grid)   # yielded last, the table read again

Only one layer's weights (the layer computes with the stream's own tensors and GPTQ writes into
them), one Hessian (factored in its own storage), two copies of the weight being rounded, the
calibration activations and attention's outputs are held (Gemma 7B: 1.1 GB of layer, 2.4 GB of
down_proj's Hessian, 0.3 GB for each copy of down_proj), then the table read again, its
GPTQ'd rows written back into it (7B: 3.1 GB in float32 at worst): memory.calibration_bytes.
Between layers, the freed working memory is handed back to the system (release_freed_memory).
The exporter fills its quantized layers from the stream as before, each calibrated one on the grid
GPTQ rounded it to (`grids`), so it stores exactly GPTQ's values.

The calibration text: --calibration FILE (plain text, or JSON lines with "text" or the dolly
fields instruction / context / response), else DEFAULT_TEXT_MODULES' documentation as installed
with Python: never the Python reference manual (pydoc_data) that verify and the tests evaluate on.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import itertools
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch
import torch.nn.functional as F

from gemma_edge.checkpoints import Checkpoint, iter_weights, weight_shapes
from gemma_edge.config import GemmaConfig
from gemma_edge.errors import ConfigError, GemmaEdgeError
from gemma_edge.exporters.gptq import add_gram, cat_grids, factor, gptq, mirrored
from gemma_edge.exporters.rewrites import attend_new_keys_only
from gemma_edge.exporters.streaming import release_freed_memory
from gemma_edge.model import DecoderLayer, RMSNorm, rope_table, rotate_half_matrix

# The length of each calibration chunk (each starts with <bos>, as the model's inputs do); the
# tokens in all are a setting (ExportSettings.calibration_tokens, default 16384: measured on the
# real 270M all-int4 ONNX, layers only, modeling_gemma.py x1.666 with 4096 tokens, x1.449 with
# 16384; the manual x1.09-1.10 either way).
CHUNK = 512
# The standard library modules whose documentation is the default calibration text: English prose
# about programs, with code in it, as most of what a Gemma is asked to do on a device. Not
# pydoc_data (the reference manual verify evaluates on).
DEFAULT_TEXT_MODULES = ("argparse", "asyncio", "collections", "contextlib", "csv", "dataclasses", "datetime",
                        "decimal", "email.message", "enum", "fractions", "functools", "heapq", "http.client",
                        "inspect", "itertools", "json", "logging", "pathlib", "pickle", "random", "re",
                        "sqlite3", "statistics", "string", "subprocess", "tarfile", "textwrap", "threading",
                        "typing", "unittest", "urllib.parse", "zipfile")


@dataclass(frozen=True)
class Calibration:
    ids: torch.Tensor  # int64 [chunks, tokens per chunk], each chunk <bos> first
    source: str  # the file, the default text's name, or "random ids" (a checkpoint without a tokenizer)
    sha256: str  # of the file's bytes (the default text: of its UTF-8)

    def manifest(self) -> dict:
        return {"text": self.source, "sha256": self.sha256, "chunks": self.ids.shape[0], "tokens_per_chunk": self.ids.shape[1]}


def default_text() -> str:
    """The docstrings of DEFAULT_TEXT_MODULES and of their public classes and functions, in order."""
    import importlib

    parts = []
    for name in DEFAULT_TEXT_MODULES:
        module = importlib.import_module(name)
        parts.append(inspect.getdoc(module) or "")
        for attr in sorted(vars(module)):
            value = getattr(module, attr)
            if not attr.startswith("_") and (inspect.isclass(value) or inspect.isfunction(value)) \
                    and getattr(value, "__module__", None) == module.__name__:
                parts.append(inspect.getdoc(value) or "")
    return "\n\n".join(p for p in parts if p)


def read_text(path: Path) -> str:
    """A calibration file's text: JSON lines ("text", or dolly's instruction / context / response,
    laid out in the instruction prompt format a fine-tune on them expects) or plain text."""
    from gemma_edge.runtime.templates import dolly_records, dolly_text

    if path.suffix in (".jsonl", ".json"):
        try:
            return "\n\n".join(dolly_text(r) for r in dolly_records(path, "--calibration"))
        except GemmaEdgeError as e:
            raise ConfigError(str(e)) from None
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"--calibration {path}: cannot read it as UTF-8 text ({e})") from None


def calibration(ckpt: Checkpoint, path: str | None, max_seq_len: int, tokens: int) -> Calibration:
    """The calibration chunks for ckpt: its tokenizer's ids of the text (the file, else the default
    text), cut into chunks of at most CHUNK (and max_seq_len) tokens, <bos> first, at most `tokens`
    in all. Random ids for a checkpoint without a tokenizer (random weights)."""
    from gemma_edge.exporters.manifest import special_tokens

    chunk = min(CHUNK, max_seq_len, tokens)
    bos = special_tokens(ckpt)["bos_token_id"]
    if path is None and not ckpt.tokenizer_files:
        rng = random.Random(0)
        ids = [[bos] + [rng.randrange(ckpt.config.vocab_size) for _ in range(chunk - 1)] for _ in range(tokens // chunk)]
        return Calibration(torch.tensor(ids), "random ids", "")
    ids, source, sha256 = text_ids(ckpt, path)
    step = chunk - 1
    count = min(tokens // chunk, len(ids) // step)
    if count == 0:
        raise ConfigError(f"the calibration text has {len(ids)} tokens; calibration needs at least {step}: "
                          "give a longer --calibration file")
    # spread evenly over the text, so that a long text is sampled whole rather than its start
    starts = [i * (len(ids) - step) // max(count - 1, 1) for i in range(count)]
    rows = [[bos] + ids[s:s + step] for s in starts]
    return Calibration(torch.tensor(rows), source, sha256)


def text_ids(ckpt: Checkpoint, path: str | None) -> tuple[list[int], str, str]:
    """The calibration text's ids in ckpt's tokenizer (the file, else the default text), its source
    and the SHA-256 of its bytes (the default text: of its UTF-8). An export asks up to three times
    (hot rows, smoothing, GPTQ's chunks), and loading Gemma 3's tokenizer takes ~3 s: the last
    answers are kept, keyed by the files' sizes and times of change."""
    if not ckpt.tokenizer_files:
        raise ConfigError(f"--calibration needs the checkpoint's tokenizer, and {ckpt.source} has none")
    from gemma_edge.exporters.manifest import special_tokens

    files = sorted(ckpt.tokenizer_files) + ([Path(path)] if path is not None else [])
    stamps = tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files if f.exists())
    ids, source, sha256 = _encoded(ckpt.hf_dir, json.dumps(special_tokens(ckpt), sort_keys=True), path, stamps)
    return list(ids), source, sha256


@functools.lru_cache(maxsize=2)
def _encoded(hf_dir: Path, special: str, path: str | None, stamps: tuple) -> tuple[tuple[int, ...], str, str]:
    from gemma_edge.runtime.tokenizer import Tokenizer

    text = read_text(Path(path)) if path is not None else default_text()
    source = str(path) if path is not None else "Python's documentation of " + ", ".join(DEFAULT_TEXT_MODULES[:3]) + ", ..."
    raw = Path(path).read_bytes() if path is not None else text.encode()
    return tuple(Tokenizer(hf_dir, json.loads(special)).encode(text)), source, hashlib.sha256(raw).hexdigest()


def hot_tokens(ckpt: Checkpoint, path: str | None, limit: int) -> tuple[torch.Tensor, dict] | None:
    """The tokens whose table rows stay 8-bit (onnx_quant.HotRowsTable): the special tokens and the
    calibration text's most frequent (ties: the lower id first), `limit` at most in all and at most a
    sixteenth of the vocabulary; int64 [n] sorted, and the manifest's record of them. None for a
    checkpoint without a tokenizer and no --calibration (random weights: no text to take them from)."""
    from gemma_edge.exporters.manifest import special_tokens

    vocab = ckpt.config.vocab_size
    limit = min(limit, vocab // 16)
    if limit == 0 or (path is None and not ckpt.tokenizer_files):
        return None
    ids, source, sha256 = text_ids(ckpt, path)
    special = special_tokens(ckpt)
    chosen = dict.fromkeys(t for t in [special["bos_token_id"], *special["stop_token_ids"]] if 0 <= t < vocab)
    counts = torch.bincount(torch.tensor(ids, dtype=torch.long), minlength=vocab)
    for t in torch.argsort(-counts, stable=True)[:limit + len(chosen)].tolist():
        if counts[t] == 0 or len(chosen) >= limit:
            break
        chosen.setdefault(t)
    rows = torch.tensor(sorted(chosen), dtype=torch.long)
    return rows, {"rows": len(rows), "text": source, "sha256": sha256, "limit": limit}


Choose = Callable[[str, torch.Tensor], object]  # (weight name, float32 weight) -> its grid (gptq.Grid)


def calibrated_weights(weights: Iterable[tuple[str, torch.Tensor]], config: GemmaConfig, ids: torch.Tensor,
                       names: set[str], choose: Choose, grids: dict[str, object],
                       read_table: Callable[[], torch.Tensor] | None = None,
                       keep: torch.Tensor | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """The weight stream (checkpoints.iter_weights' order: the embedding first, then layer by layer,
    the final norm, an untied head) with the weights named in `names` rounded by GPTQ, on choose's
    grid for each, which is recorded in `grids` before the weight is yielded: in float32 (a table in
    its own dtype where that holds GPTQ's values, see calibrate_head). The output
    projection (head_weight: a tied table, or lm_head.weight) is calibrated on the final norm's
    outputs; a tied table is then yielded last, once they are known, read again with read_table
    (else held from the start: Gemma 7B's, 1.5 GB in bf16); its rows `keep` are not rounded
    (calibrate_head)."""
    stream = iter(weights)
    name, table = next(stream)
    if name != "embed_tokens.weight":
        raise RuntimeError(f"calibration needs the embedding first in the weight stream, got {name}")
    x = embed_chunks(ids, table, config)
    held = name in names and config.tie_word_embeddings
    if not held:
        yield name, table
    if not held or read_table is not None:
        table = None  # not held through the layers (Gemma 7B's: 1.5 GB in bf16)
    for index, group in itertools.groupby(stream, key=lambda item: layer_index(item[0])):
        tensors = dict(group)
        release_freed_memory()  # the previous layer's working blocks (streaming.release_freed_memory)
        if index is not None:
            tensors, x = calibrate_layer(index, tensors, x, config, names, choose, grids)
        elif "norm.weight" in tensors:
            x = _final_norm(x, tensors["norm.weight"], config)
            if "lm_head.weight" in names:
                tensors["lm_head.weight"] = calibrate_head("lm_head.weight", tensors["lm_head.weight"], x, choose, grids)
        yield from tensors.items()
    if held:
        release_freed_memory()
        yield name, calibrate_head(name, table if table is not None else read_table(), x, choose, grids, keep=keep)


def calibrate_head(name: str, weight: torch.Tensor, x: torch.Tensor, choose: Choose, grids: dict[str, object],
                   rows: int = 1 << 13, keep: torch.Tensor | None = None) -> torch.Tensor:
    """The output projection [vocab, hidden] rounded by GPTQ on its inputs x [chunks, tokens, hidden]
    (the final norm's outputs), a block of rows at a time (rows are independent given the Hessian),
    each block written back into weight (the caller's own copy: it is overwritten) in weight's dtype,
    so the 262k-row table is never held twice. A bf16 table keeps GPTQ's values in bf16 (Gemma 7B:
    1.5 GB, where a float32 result beside the table took 4.6) as long as each is within a quarter of
    its grid step of the value GPTQ chose (on_grid_in), so that the exporter's rounding onto the same
    grid stores exactly GPTQ's values; if a block is not, the result moves to float32 whole.
    keep (int64 row ids): rows left as they are (a HotRowsTable's 8-bit rows: rows are independent
    in GPTQ, so the others are rounded as without them)."""
    inputs = x.reshape(-1, x.shape[-1])
    kept = torch.zeros(weight.shape[0], dtype=torch.bool)
    if keep is not None:
        kept[keep] = True
    f = factor(inputs.T @ inputs)  # one for every block of rows
    out = weight
    parts = []
    for start in range(0, weight.shape[0], rows):
        block = out[start:start + rows].float()
        grid = choose(name, block)
        rounded = gptq(block, f, grid)
        if not on_grid_in(out.dtype, rounded, grid):
            out = out.float()
        here = kept[start:start + rows]
        rounded[here] = block[here]  # exact in out's dtype: read from it
        out[start:start + rows] = rounded
        parts.append(grid)
    grids[name] = cat_grids(parts)
    return out


def on_grid_in(dtype: torch.dtype, values: torch.Tensor, grid) -> bool:
    """Whether values [rows, cols] on grid (float32) still round to the same grid points once held
    in dtype: each moved by at most a quarter of its group's step (grid.steps). A grid reaching
    zero (ONNX's blocks span [min(w, 0), max(w, 0)]: a value is at most 15 steps) always passes in
    bf16, which moves a value by at most 2^-8 of it (0.06 of a step); a .pte group with an offset
    can fail, if its values are far from zero against its range."""
    if dtype == torch.float32:
        return True
    moved = (values.to(dtype).float() - values).abs_()
    return bool((moved <= 0.25 * grid.steps(values.shape[1])).all())


def _final_norm(x: torch.Tensor, weight: torch.Tensor, config: GemmaConfig) -> torch.Tensor:
    norm = RMSNorm(config.hidden_size, config.rms_norm_eps).requires_grad_(False)
    norm.weight.copy_(weight)
    with torch.no_grad():
        return norm(x)


def embed_chunks(ids: torch.Tensor, table: torch.Tensor, config: GemmaConfig) -> torch.Tensor:
    """The calibration chunks ids [chunks, tokens] embedded as Gemma.hidden_states embeds them
    (scaled by sqrt(hidden), float32): the first layer's inputs [chunks, tokens, hidden]."""
    return F.embedding(ids, table).float() * torch.tensor(config.embedding_scale, dtype=torch.float32)


def layer_index(name: str) -> int | None:
    """The decoder layer a weight of the stream belongs to (layers.N. ...), else None."""
    return int(name.split(".")[1]) if name.startswith("layers.") else None


@torch.no_grad()
def calibrate_layer(index: int, tensors: dict[str, torch.Tensor], x: torch.Tensor, config: GemmaConfig, names: set[str],
                    choose: Choose, grids: dict[str, object]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Decoder layer `index` from its weights (full names): its calibrated weights (the others as
    they came) and its output on x [chunks, tokens, hidden] computed with them (in x's storage).

    True-sequential GPTQ: the layer goes forward over all the chunks one step at a time, each step up
    to the next linear layers that read one input (q, k and v; o; gate and up; down), which are then
    calibrated on that input as the layer computes it with the linears before them already rounded,
    as the device will; the chunks go on from there. The layer runs once (gate's and up's products
    twice: down's input is not held), attention's output held for all the chunks between its step
    and o's ([chunks, tokens, heads * head_dim]). Gathering every Hessian on the float layer first took
    a forward more (the real 270M's all-int4 .pte: build_model 93 -> 63 s, 2 cores)."""
    prefix = f"layers.{index}."
    layer = build_layer(index, tensors, config, x.shape[1])
    linears = {f"{prefix}{n}.weight": m for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}
    calibrated = {n: m for n, m in linears.items() if n in names}
    if not calibrated:  # nothing to learn here (the phone recipe calibrates the table alone): its output only
        return tensors, run_layer(layer, x, config)
    out = dict(tensors)

    def calibrate(inputs: Iterator[torch.Tensor], *modules: torch.nn.Linear) -> None:
        """GPTQ for those of modules that are calibrated, on the Hessian of the input they share,
        each chunk's as `inputs` yields it (consumed whole, so the chunks' step is done either way)."""
        group = [n for n, m in calibrated.items() if any(m is module for module in modules)]
        hessian = None
        for chunk in inputs:
            if group:
                chunk = chunk.reshape(-1, chunk.shape[-1]).float()
                if hessian is None:
                    hessian = chunk.new_zeros(chunk.shape[1], chunk.shape[1])
                add_gram(hessian, chunk)
        if not group:
            return
        release_freed_memory()
        f = factor(mirrored(hessian))  # in the Hessian's storage (down_proj's: 2.4 GB at 7B)
        del hessian
        for n in group:
            weight = calibrated[n].weight
            grids[n] = choose(n, weight)
            weight.copy_(gptq(weight, f, grids[n]))
            out[n] = weight.detach()  # the layer's own storage: no copy

    attn, mlp = layer.attn, layer.mlp
    call = _call_inputs(layer, x.shape[1], config)
    calibrate((layer.attn_norm(chunk) for chunk in x), attn.q_proj, attn.k_proj, attn.v_proj)
    heads = torch.empty(*x.shape[:2], attn.o_proj.in_features)  # attention's outputs, o_proj's input

    def attended() -> Iterator[torch.Tensor]:
        for chunk, held in zip(x, heads):
            attn.cache.reset()
            held.copy_(_input_of(attn.o_proj, attn, layer.attn_norm(chunk), *call))
            yield held
    calibrate(attended(), attn.o_proj)

    def attention_added() -> Iterator[torch.Tensor]:
        for chunk, held in zip(x, heads):
            h = attn.o_proj(held)
            chunk += h if layer.attn_post_norm is None else layer.attn_post_norm(h)  # as DecoderLayer.forward
            yield layer.ffn_norm(chunk)
    calibrate(attention_added(), mlp.gate_proj, mlp.up_proj)
    del heads
    calibrate((_input_of(mlp.down_proj, mlp, layer.ffn_norm(chunk)) for chunk in x), mlp.down_proj)
    for chunk in x:
        h = mlp(layer.ffn_norm(chunk))
        chunk += h if layer.ffn_post_norm is None else layer.ffn_post_norm(h)
    return out, x


class _Read(Exception):
    """The linear layer _input_of waits for has its input: the rest of the forward is not needed."""


def _input_of(linear: torch.nn.Linear, module: torch.nn.Module, *args) -> torch.Tensor:
    """The input `linear` reads when module(*args) runs: module's forward up to linear's product (which
    is not computed)."""
    def hook(_, inputs):
        raise _Read(inputs[0])

    handle = linear.register_forward_pre_hook(hook)
    try:
        module(*args)
    except _Read as read:
        return read.args[0]
    finally:
        handle.remove()
    raise RuntimeError(f"{type(module).__name__} did not call the linear layer it was asked for")


def build_layer(index: int, tensors: dict[str, torch.Tensor], config: GemmaConfig, tokens: int) -> DecoderLayer:
    """Decoder layer `index` in float32, its parameters the tensors given themselves where they are
    float32 (not copies: calibrate_layer overwrites the linear weights with GPTQ's values), else
    float32 copies of them. Its attention reads each chunk's own keys alone (every chunk starts at
    position 0, run_layer): the eager layer also multiplies by every slot of its empty cache and
    masks them all, half of attention's products and of its softmax's work here (the real 270M's
    calibration: attention 24 -> 10 s) for the same outputs, bit for bit."""
    prefix = f"layers.{index}."
    with torch.device("meta"):
        layer = attend_new_keys_only(DecoderLayer(config, config.layer_types[index], tokens, torch.float32))
    layer.to_empty(device="cpu").requires_grad_(False)
    layer.attn.cache.reset()
    for name, tensor in tensors.items():
        local = name[len(prefix):]
        if layer.get_parameter(local).shape != tensor.shape:
            raise RuntimeError(f"{name}: shape {tuple(tensor.shape)}, the layer's is {tuple(layer.get_parameter(local).shape)}")
        module, _, leaf = local.rpartition(".")
        setattr(layer.get_submodule(module), leaf, torch.nn.Parameter(tensor.float(), requires_grad=False))
    return layer.eval()


def run_layer(layer: DecoderLayer, x: torch.Tensor, config: GemmaConfig) -> torch.Tensor:
    """The layer on each chunk of x [chunks, tokens, hidden] from position 0: [chunks, tokens, hidden]."""
    inputs = _call_inputs(layer, x.shape[1], config)
    out = []
    for chunk in x:
        layer.attn.cache.reset()
        out.append(layer(chunk, *inputs))
    return torch.stack(out)


def _call_inputs(layer: DecoderLayer, tokens: int, config: GemmaConfig) -> tuple[torch.Tensor, ...]:
    """What a layer's forward takes beside its input, for a chunk of `tokens` from position 0:
    positions, cos, sin, mask, rotate."""
    positions = torch.arange(tokens)
    cos, sin = rope_table(config, layer.layer_type, tokens)
    return positions, cos, sin, layer.attn.mask(positions, torch.float32), rotate_half_matrix(config.head_dim)


def recipe_calibration(ckpt: Checkpoint, settings) -> Calibration | None:
    """The calibration settings.recipe learns from: None for rtn, which learns nothing."""
    settings = settings.for_model(ckpt.config)
    return None if settings.recipe == "rtn" else calibration(ckpt, settings.calibration, settings.max_seq_len,
                                                               settings.calibration_tokens)


def load_stage(calib: Calibration | None) -> str:
    """The name of an export's first stage, which calibrates too when there is a calibration."""
    return "load and quantize" if calib is None else "load, calibrate and quantize"


def calibrated_stream(ckpt: Checkpoint, settings, weights: Iterable[tuple[str, torch.Tensor]], names: set[str],
                      choose: Choose, grids: dict[str, object],
                      calib: Calibration | None = None, keep: torch.Tensor | None = None) -> Iterable[tuple[str, torch.Tensor]]:
    """weights as settings.recipe rounds them: unchanged for rtn; for gptq, the weights in names
    calibrated (calibrated_weights) on calib (else the settings' text, see calibration()), the
    table's rows keep left as they are."""
    if settings.for_model(ckpt.config).recipe == "rtn":
        return weights
    calib = calib or recipe_calibration(ckpt, settings)
    return calibrated_weights(weights, ckpt.config, calib.ids, names, choose, grids,
                              read_table=lambda: next(iter(iter_weights(ckpt)))[1], keep=keep)  # the first weight, alone


def recipe_record(settings, calib: Calibration | None) -> dict:
    """The manifest's record of how the 4-bit layers were rounded (settings for the model: no auto)."""
    assert settings.recipe != "auto", "recipe_record needs the settings for_model() resolved"
    if settings.recipe == "rtn":
        return {"name": "rtn"}
    from gemma_edge.exporters.gptq import BLOCK, DAMPING

    return {"name": settings.recipe, "damping": DAMPING, "block": BLOCK, "order": "act order (Hessian diagonal)",
            "groups": "static (each group's grid chosen from the layer's weights first)", "calibration": calib.manifest()}


def linear_weights(config: GemmaConfig) -> set[str]:
    """The decoder layers' linear weights, by their plain names."""
    return {n for n in weight_shapes(config) if n.startswith("layers.") and n.endswith("_proj.weight")}


def head_weight(config: GemmaConfig) -> str:
    """The output projection's weight in the plain model's names: the tied table, or lm_head's."""
    return "embed_tokens.weight" if config.tie_word_embeddings else "lm_head.weight"
