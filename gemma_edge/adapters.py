"""PEFT LoRA adapters, merged into a checkpoint's weights as they stream to an exporter.

A fine-tune saved by PEFT (or unsloth, which saves PEFT's layout) is a folder:
    adapter_config.json          peft_type "LORA", r, lora_alpha, use_rslora, target_modules, ...
    adapter_model.safetensors    per adapted module M: M.lora_A.weight [r, in], M.lora_B.weight [out, r]
                                 (an embedding: M.lora_embedding_A [r, vocab], M.lora_embedding_B [hidden, r]);
                                 per module in modules_to_save: its whole trained weight

Merging is PEFT's merge_and_unload() done one weight at a time, in float32, as checkpoints'
iter_weights yields it: W + (B @ A) * scale, scale = alpha / r (alpha / sqrt(r) with use_rslora),
r and alpha per module from rank_pattern / alpha_pattern. So a 7B base and its adapter are never
held whole: one weight and the adapter's pair for it (tests/test_adapters.py compares with PEFT).

Gemma ties its output projection to the embedding. PEFT keeps the tie where it merges in place
(LoRA on embed_tokens or lm_head changes the one shared table) but not for modules_to_save, which
trains a copy of the module: with modules_to_save=["embed_tokens"] the fine-tune reads tokens
through the trained table and predicts them through the base's (unless ensure_weight_tying saved
one table for both). The merged model then has two tables, and so has its export (untied_config).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch

from gemma_edge.config import GemmaConfig
from gemma_edge.errors import GemmaEdgeError

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
TABLE, HEAD = "embed_tokens.weight", "lm_head.weight"  # our names of the tied pair
# LoRA options whose merge is not W + scale * B @ A, or that change more than the weights: refused
# by name rather than merged wrong.
VARIANTS = {
    "use_dora": "DoRA (weight-decomposed LoRA: a magnitude vector rescales each merged column)",
    "lora_bias": "LoRA with a bias on B",
    "use_qalora": "QA-LoRA (its A acts on pooled input groups)",
    "alora_invocation_tokens": "activated LoRA (aLoRA: the adapter acts only after its invocation tokens)",
    "layer_replication": "layer replication (it adds decoder layers)",
    "target_parameters": "LoRA on bare parameters (target_parameters)",
    "trainable_token_indices": "trainable tokens (trainable_token_indices)",
    "use_bdlora": "BD-LoRA (block-diagonal factors)",
    "kasa_config": "KaSA (it truncates the base weight's singular values)",
    "monteclora_config": "MonteCLoRA",
    "arrow_config": "Arrow routing between adapters",
}
# Initializations that also rewrite the base's weights (the principal components of W moved into the
# adapter, or W replaced by its quantization residual): merged into the original base they are wrong.
BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq")
# Where a LoRA pair for module M is stored, and what its delta is: lora_A/lora_B for linear layers
# (B @ A: [out, in]); lora_embedding_A/B for an embedding ((B @ A).T: [vocab, hidden]).
_PAIR = re.compile(r"(?P<module>.+)\.(?P<part>lora_A|lora_B)\.weight|(?P<emodule>.+)\.(?P<epart>lora_embedding_A|lora_embedding_B)")


class AdapterError(GemmaEdgeError):
    """An adapter folder cannot be merged into this base: unreadable, of another type, or of another model."""


@dataclass(frozen=True)
class Lora:
    """One module's LoRA pair in the adapter file, and its scale."""

    a: str  # tensor name of A in the adapter file
    b: str
    scale: float  # lora_alpha / r, or lora_alpha / sqrt(r) (use_rslora)
    embedding: bool  # lora_embedding_A/B: the delta is (B @ A).T


@dataclass(frozen=True)
class Adapter:
    """A PEFT LoRA adapter read from its folder and matched to a base, not yet merged."""

    folder: Path
    sha256: str  # of adapter_model.safetensors
    rank: int  # r (modules in rank_pattern may differ)
    alpha: float  # lora_alpha (modules in alpha_pattern may differ)
    use_rslora: bool
    target_modules: tuple[str, ...]  # as adapter_config.json names them (a regex is one entry)
    modules_to_save: tuple[str, ...]
    base_model: str | None  # base_model_name_or_path, as recorded at training
    lora: dict[str, Lora] = field(default_factory=dict)  # our parameter name -> its pair
    saved: dict[str, str] = field(default_factory=dict)  # our parameter name -> its trained copy (modules_to_save)
    in_place: dict[str, str] = field(default_factory=dict)  # our parameter name -> the base weight it was trained on

    @property
    def weights(self) -> Path:
        return self.folder / WEIGHTS_FILE

    def describe(self) -> dict:
        """What the manifest records of it."""
        return {"name": self.folder.name, "path": str(self.folder.resolve()), "sha256": self.sha256, "rank": self.rank,
                "alpha": self.alpha, "use_rslora": self.use_rslora, "target_modules": list(self.target_modules),
                "modules_to_save": list(self.modules_to_save), "base_model": self.base_model,
                "merged_weights": len(self.lora.keys() | self.saved.keys() | self.in_place.keys())}

    def tensor(self, name: str, rows: slice | None = None) -> torch.Tensor:
        """A tensor of the adapter file (rows: a block of its rows only), read when asked for."""
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(self.weights, framework="pt") as handle:
                return handle.get_tensor(name) if rows is None else handle.get_slice(name)[rows]
        except (SafetensorError, RuntimeError, OSError) as e:
            raise AdapterError(f"{self.weights}: cannot read tensor {name} ({e})") from None

    def same(self, first: str, second: str, block: int = 8192) -> bool:
        """Whether two tensors of the file are equal, compared a block of rows at a time (two
        saved tables of Gemma 7B: 3 GB each in float32)."""
        from safetensors import safe_open

        with safe_open(self.weights, framework="pt") as handle:
            rows = handle.get_slice(first).get_shape()[0]
        return all(torch.equal(self.tensor(first, slice(i, i + block)), self.tensor(second, slice(i, i + block)))
                   for i in range(0, rows, block))


def read_adapter(folder: str | Path, base: GemmaConfig) -> Adapter:
    """An adapter folder, checked against the base it is to be merged into (the config of the
    checkpoint it was trained on): every tensor must be a LoRA pair of a module the base has, of
    that module's shape, or a whole module_to_save of its shape."""
    from gemma_edge.checkpoints import _IGNORED, _canonical, weight_names, weight_shapes
    from gemma_edge.files import sha256_file

    folder = Path(folder).expanduser()
    raw = _read_config(folder)
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        pickles = [p.name for p in folder.glob("adapter_model.bin")]
        fix = (f"it has {pickles[0]}, a pickle, which gemma-edge never loads: re-save it with "
               "model.save_pretrained(folder, safe_serialization=True)" if pickles else
               "copy the whole folder that PeftModel.save_pretrained() wrote")
        raise AdapterError(f"{folder}: no {WEIGHTS_FILE}; {fix}")
    r, alpha = raw.get("r"), raw.get("lora_alpha")
    if not isinstance(r, int) or r < 1 or not isinstance(alpha, (int, float)):
        raise AdapterError(f"{folder / CONFIG_FILE}: r must be a positive integer and lora_alpha a number, "
                           f"got r={r!r}, lora_alpha={alpha!r}")
    rank_pattern, alpha_pattern = raw.get("rank_pattern") or {}, raw.get("alpha_pattern") or {}
    rslora = bool(raw.get("use_rslora"))
    targets = raw.get("target_modules") or ()
    targets = (targets,) if isinstance(targets, str) else tuple(targets)
    to_save = tuple(raw.get("modules_to_save") or ())

    names = weight_names(replace(base, tie_word_embeddings=False))  # an untied name for lm_head too
    modules = {hf.removesuffix(".weight"): ours for hf, ours in names.items()}
    shapes = weight_shapes(replace(base, tie_word_embeddings=False))
    _check_targets(folder, targets, modules)
    tensors = _tensor_shapes(weights)
    pairs: dict[str, dict[str, str]] = {}
    saved: dict[str, str] = {}
    in_place: dict[str, str] = {}
    original: dict[str, str] = {}  # module -> its name in the adapter (PEFT's rank/alpha patterns match that one)
    for key in tensors:
        name = _canonical(key.removeprefix("base_model.model."))
        if _IGNORED.match(name):
            continue  # a multimodal Gemma 3's vision tower: not part of the text model exported
        match = _PAIR.fullmatch(name)
        if match:
            module = match["module"] or match["emodule"]
            original[module] = re.sub(r"\.(lora_[AB]\.weight|lora_embedding_[AB])$", "", key.removeprefix("base_model.model."))
            part = (match["part"] or match["epart"]).removeprefix("lora_embedding_").removeprefix("lora_")
            if module not in modules:
                raise AdapterError(f"{weights}: {key} adapts {module}, which the base ({base.model_type}, "
                                   f"{base.num_hidden_layers} layers of {_module_kinds(modules)}) does not have; "
                                   "was it trained on another model "
                                   f"({raw.get('base_model_name_or_path') or 'not recorded'})?")
            pairs.setdefault(module, {})[part] = key
            pairs[module]["embedding"] = "embedding" if match["emodule"] else ""
        elif name.endswith(".base_layer.weight") and name.removesuffix(".base_layer.weight") in modules:
            # The base's own weight, saved beside a LoRA pair on an embedding (PEFT's save_embedding_layers):
            # PEFT loads it into the base in place, so it replaces the base's weight (a tied table: both uses).
            in_place[modules[name.removesuffix(".base_layer.weight")]] = key
        elif name.endswith(".weight") and name.removesuffix(".weight") in modules:
            saved[modules[name.removesuffix(".weight")]] = key  # a module_to_save: a trained copy of the module
        else:
            raise AdapterError(f"{weights}: tensor {key} is not a LoRA pair or a saved module gemma-edge can merge "
                               "(DoRA's magnitudes, biases and other adapter types are not merged); "
                               "export with the PEFT LoRA adapter of this fine-tune")
    lora = {}
    for module, parts in pairs.items():
        ours = modules[module]
        if "A" not in parts or "B" not in parts:
            raise AdapterError(f"{weights}: {module} has lora_{'A' if 'A' not in parts else 'B'} missing; "
                               "the file is incomplete: save the adapter again")
        a, b = tensors[parts["A"]], tensors[parts["B"]]
        module_r = rank_pattern.get(_pattern_key(rank_pattern, original[module]), r)
        module_alpha = alpha_pattern.get(_pattern_key(alpha_pattern, original[module]), alpha)
        out, cols = shapes[ours]
        want_a, want_b = ([module_r, out], [cols, module_r]) if parts["embedding"] else ([module_r, cols], [out, module_r])
        if list(a) != want_a or list(b) != want_b:
            raise AdapterError(
                f"{weights}: {module}'s LoRA pair is {list(a)} x {list(b)}, but this base's {module} of shape [{out}, {cols}] "
                f"at rank {module_r} needs A {want_a} and B {want_b}: the adapter was trained on another model "
                f"({raw.get('base_model_name_or_path') or 'not recorded'}) or its config's r does not match its weights")
        scale = module_alpha / math.sqrt(module_r) if rslora else module_alpha / module_r
        lora[ours] = Lora(parts["A"], parts["B"], scale, bool(parts["embedding"]))
    for ours, key in {**saved, **in_place}.items():
        if list(tensors[key]) != list(shapes[ours]):
            detail = (" (the fine-tune resized the vocabulary: gemma-edge exports the base's vocabulary only)"
                      if ours in (TABLE, HEAD) else "")
            raise AdapterError(f"{weights}: the saved {key} has shape {list(tensors[key])}, this base's "
                               f"{ours.removesuffix('.weight')} {list(shapes[ours])}{detail}")
    if not lora and not saved:
        raise AdapterError(f"{weights}: holds no LoRA weights; is it the adapter of this fine-tune?")
    return Adapter(folder, sha256_file(weights), r, float(alpha), rslora, targets, to_save,
                   raw.get("base_model_name_or_path"), lora, saved, in_place)


def _read_config(folder: Path) -> dict:
    path = folder / CONFIG_FILE
    if not folder.is_dir():
        raise AdapterError(f"--adapter {folder}: no such folder; give the folder PeftModel.save_pretrained() wrote")
    if not path.is_file():
        raise AdapterError(f"{folder}: no {CONFIG_FILE}; give the folder PeftModel.save_pretrained() wrote "
                           f"(it holds {CONFIG_FILE} and {WEIGHTS_FILE})")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise AdapterError(f"{path}: not a PEFT adapter config (a JSON object)")
    kind = str(raw.get("peft_type", "")).upper()
    if kind != "LORA":
        raise AdapterError(f"{path}: a {raw.get('peft_type') or 'untyped'} adapter; gemma-edge merges LoRA adapters "
                           "(peft_type LORA, as trained by PEFT, unsloth or TRL), not other adapter types")
    init = raw.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(BASE_CHANGING_INITS):
        raise AdapterError(f"{path}: init_lora_weights {init!r} changes the base's weights as well as the adapter's, so "
                           "this adapter does not belong to the base you point at; save it converted to a plain LoRA "
                           "(PEFT's save_pretrained(..., path_initial_model_for_weight_conversion=...)) or merge it with "
                           "PEFT and export the merged folder")
    for option, what in VARIANTS.items():
        if raw.get(option):
            raise AdapterError(f"{path}: {option} is set: {what} is not merged by gemma-edge (it is not "
                               "W + scale * B @ A); merge it with PEFT's merge_and_unload(), save_pretrained() the "
                               "result, and export that folder")
    return raw


def _check_targets(folder: Path, targets: tuple[str, ...], modules: dict[str, str]) -> None:
    """target_modules given as a list name module suffixes: each must name a kind of module of the
    base (a GPT-2 adapter's "c_attn" does not). A regex string is checked by the weights alone."""
    regex = len(targets) == 1 and not re.fullmatch(r"[\w.]+", targets[0])
    if regex or targets == ("all-linear",):
        return
    unknown = [t for t in targets if not any(m == t or m.endswith("." + t) for m in modules)]
    if unknown:
        raise AdapterError(f"{folder / CONFIG_FILE}: target_modules {', '.join(unknown)} do not exist in this Gemma "
                           f"(its layers: {_module_kinds(modules)}); the adapter was trained on another architecture")


def _module_kinds(modules: dict[str, str]) -> str:
    return ", ".join(sorted({m.rsplit(".", 1)[-1] for m in modules if "norm" not in m}))


def _tensor_shapes(weights: Path) -> dict[str, list[int]]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(weights, framework="pt") as handle:
            return {k: list(handle.get_slice(k).get_shape()) for k in handle.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise AdapterError(f"{weights}: not a readable safetensors file ({e}); save the adapter again") from None


def _pattern_key(patterns: dict, module: str) -> str:
    """PEFT's get_pattern_key: the first pattern that matches the end of the module's name."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return module


# ----------------------------------------------------------------------------------------------
# Merging, as the weights stream.

@dataclass(frozen=True)
class Merge:
    """What the adapters do to each weight, in order: ("lora", adapter, Lora) adds a delta,
    ("saved", adapter, tensor name) replaces the weight. untied: the merged model's table and
    output projection differ although the base ties them."""

    steps: dict[str, list[tuple[str, Adapter, object]]]
    untied: bool


def plan(adapters: Sequence[Adapter], base: GemmaConfig) -> Merge:
    """The steps of each weight, stacked adapters in order (each trained on the merge of those
    before it, as PEFT's merge_and_unload() then a new adapter leaves it)."""
    steps: dict[str, list] = {}
    tied = base.tie_word_embeddings
    for adapter in adapters:
        if tied and {TABLE, HEAD} & adapter.saved.keys():
            # A module_to_save is a trained copy: saving one of the pair unties it; ensure_weight_tying saves both, equal.
            tied = {TABLE, HEAD} <= adapter.saved.keys() and adapter.same(adapter.saved[TABLE], adapter.saved[HEAD])
        # Whole weights first, then the deltas trained on them.
        changes = ([("saved", n, k) for n, k in {**adapter.in_place, **adapter.saved}.items()]
                   + [("lora", n, pair) for n, pair in adapter.lora.items()])
        for kind, name, what in changes:
            if tied and name == HEAD and kind == "saved" and TABLE in adapter.saved:
                continue  # the same tensor as the table's (ensure_weight_tying), which takes both uses below
            # A tied table changed in place changes both its uses: PEFT adds a delta to the shared tensor.
            for target in ((TABLE, HEAD) if tied and name in (TABLE, HEAD) else (name,)):
                steps.setdefault(target, []).append((kind, adapter, what))
    return Merge(steps, untied=base.tie_word_embeddings and not tied)


def untied_config(config: GemmaConfig, merge: Merge) -> GemmaConfig:
    """The merged model's architecture: the base's, with its own output projection if the adapters untie it."""
    return replace(config, tie_word_embeddings=False) if merge.untied else config


def merged(weights: Iterator[tuple[str, torch.Tensor]], merge: Merge,
           read_table: Callable[[], torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
    """The base's weight stream with the adapters merged (weights touched become float32); then,
    if the adapters untie the table, lm_head.weight: the base's table read again (read_table) with
    the output projection's steps, so that the table is not held through every layer."""
    for name, tensor in weights:
        yield name, _apply(tensor, merge.steps.get(name, ()))
    if merge.untied:
        yield HEAD, _apply(read_table(), merge.steps.get(HEAD, ()))


def _apply(weight: torch.Tensor, steps) -> torch.Tensor:
    """weight after each step. A delta is added in place, to the stream's own tensor (every stream
    tensor is fresh: safetensors reads copy, random ones are drawn) or to its float32 copy, so one
    weight costs one delta of its shape more (Gemma 7B's MLP: 0.3 GB), in PEFT's order of operations."""
    for kind, adapter, what in steps:
        if kind == "saved":
            weight = adapter.tensor(what)
            continue
        a, b = adapter.tensor(what.a).float(), adapter.tensor(what.b).float()
        delta = b @ a  # [out, in]; an embedding's [hidden, vocab]
        delta.mul_(what.scale)  # PEFT: transpose(B @ A) * scaling, then W + delta
        weight = weight.float()
        weight.add_(delta.T if what.embedding else delta)
        del delta
    return weight


__all__ = ["Adapter", "AdapterError", "Merge", "read_adapter", "plan", "untied_config", "merged"]
