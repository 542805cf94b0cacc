"""A fine-tune to the phone: PEFT LoRA adapters merged into the base as it streams to the exporters
(gemma_edge/adapters.py), compared with PEFT itself.

Each tiny family gets a LoRA on q/k/v/o and gate/up/down trained by PEFT for a few steps on
dolly-style examples in the instruction format, so its outputs really change: Gemma 1 a plain
LoRA, Gemma 2 rsLoRA, Gemma 3 with the embedding trained too (modules_to_save, which unties the
output projection from the table as PEFT's merged model has it).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from gemma_edge.adapters import AdapterError
from gemma_edge.checkpoints import iter_weights, load_model, resolve, weight_names

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
FAMILIES = {
    "tiny-gemma": dict(r=8, lora_alpha=16),
    "tiny-gemma2": dict(r=8, lora_alpha=4, use_rslora=True),  # scale alpha / sqrt(r)
    "tiny-gemma3": dict(r=8, lora_alpha=16, modules_to_save=["embed_tokens"]),  # the embedding trained whole
}
DOLLY = [
    {"instruction": "Name a color.", "context": "", "response": "Red."},
    {"instruction": "Say hello.", "context": "", "response": "Hi there!"},
    {"instruction": "Add the numbers.", "context": "2 and 3", "response": "5"},
    {"instruction": "Which is the capital?", "context": "France", "response": "Paris."},
    {"instruction": "Name a fruit.", "context": "", "response": "An apple."},
    {"instruction": "Answer yes or no.", "context": "Is ice cold?", "response": "Yes."},
]
MAX_SEQ_LEN = 128


def _tokenizer(folder: Path):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(folder / "tokenizer.json"))


def _prompt_ids(folder: Path, record: dict) -> list[int]:
    """The record's prompt as generate --template instruction lays it out: <bos> + the format's text."""
    from gemma_edge.runtime.templates import dolly_prompt, instruction_response

    return [2] + _tokenizer(folder).encode("".join(instruction_response(dolly_prompt(record))), add_special_tokens=False).ids


def train_adapter(base: Path, out: Path, steps: int = 20, seed: int = 0, lr: float = 5e-3, **lora) -> Path:
    """A LoRA trained by PEFT on DOLLY (the loss on the response + <eos> after each prompt), saved
    with save_pretrained."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, attn_implementation="eager")
    peft = get_peft_model(model, LoraConfig(target_modules=PROJECTIONS, lora_dropout=0.0, **lora))
    tokenizer = _tokenizer(base)
    examples = [(_prompt_ids(base, r), tokenizer.encode(r["response"], add_special_tokens=False).ids + [1]) for r in DOLLY]
    trained = [p for p in peft.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=lr)
    for _ in range(steps):
        for prompt, response in examples:
            ids = torch.tensor([prompt + response])
            labels = torch.tensor([[-100] * len(prompt) + response])  # transformers' "not scored"
            peft(input_ids=ids, labels=labels).loss.backward()
            torch.nn.utils.clip_grad_norm_(trained, 1.0)  # the tiny models' large weights diverge without it
            optimizer.step()
            optimizer.zero_grad()
    peft.save_pretrained(out)
    return out


def peft_merged(base: Path, *adapters: Path) -> torch.nn.Module:
    """PEFT's own merge: each adapter loaded onto the merge of those before it, then merge_and_unload()."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, attn_implementation="eager")
    for adapter in adapters:
        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    return model.eval()


@pytest.fixture(scope="module")
def fine_tunes(tiny_with_tokenizers, tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """{family: (base folder, its trained adapter folder)}."""
    root = tmp_path_factory.mktemp("adapters")
    return {name: (tiny_with_tokenizers[name], train_adapter(tiny_with_tokenizers[name], root / name, **lora))
            for name, lora in FAMILIES.items()}


def _ours(ckpt) -> dict[str, torch.Tensor]:
    return dict(iter_weights(ckpt))


@pytest.mark.parametrize("name", list(FAMILIES))
def test_the_merge_is_pefts_merge_and_the_fine_tune_changed_the_model(fine_tunes, name):
    base, adapter = fine_tunes[name]
    ckpt = resolve(base, [adapter])
    reference = peft_merged(base, adapter)
    theirs = reference.state_dict()
    ours = _ours(ckpt)
    names = weight_names(ckpt.config)
    assert set(names.values()) == set(ours)
    for hf, mine in names.items():  # bit for bit: the same float32 operations in the same order
        assert torch.equal(ours[mine], theirs[hf]), hf
    assert ckpt.config.tie_word_embeddings == (name != "tiny-gemma3")  # modules_to_save unties, as in PEFT
    if name == "tiny-gemma3":
        assert not torch.equal(theirs["lm_head.weight"], theirs["model.embed_tokens.weight"])

    ids = _prompt_ids(base, DOLLY[0])
    from gemma_edge.runtime.eager import EagerBackend

    logits = torch.as_tensor(EagerBackend(load_model(ckpt, MAX_SEQ_LEN)).forward(ids, 0))
    with torch.no_grad():
        want = reference(torch.tensor([ids])).logits[0]
        before = peft_merged(base)(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(logits, want, atol=1e-5, rtol=1e-5)
    assert (want - before).abs().max() > 1.0  # trained: the adapter moved the logits by whole units


def test_stacked_adapters_merge_in_order(fine_tunes, tmp_path):
    """--adapter A --adapter B: B trained on the merge of A, as PEFT stacks them."""
    base, first = fine_tunes["tiny-gemma"]
    merged_first = tmp_path / "merged-first"
    peft_merged(base, first).save_pretrained(merged_first)
    shutil.copy(base / "tokenizer.json", merged_first)
    second = train_adapter(merged_first, tmp_path / "second", steps=2, seed=1, r=4, lora_alpha=8)
    theirs = peft_merged(base, first, second).state_dict()
    ours = _ours(resolve(base, [first, second]))
    for hf, mine in weight_names(resolve(base).config).items():
        assert torch.equal(ours[mine], theirs[hf]), hf
    only_first = _ours(resolve(base, [first]))
    assert not torch.equal(ours["layers.0.attn.q_proj.weight"], only_first["layers.0.attn.q_proj.weight"])


@pytest.mark.parametrize("case", [
    dict(target_modules=["embed_tokens", "q_proj"]),  # LoRA on the tied table: both its uses change
    dict(target_modules=["q_proj", "v_proj", "down_proj"], rank_pattern={"v_proj": 2},
         alpha_pattern={"layers.0.self_attn.q_proj": 32}),
    dict(target_modules=["q_proj"], modules_to_save=["embed_tokens"], ensure_weight_tying=True),  # one table, kept tied
    dict(target_modules=["q_proj"], modules_to_save=["lm_head"]),  # the head trained: untied
    dict(target_modules=["o_proj"], fan_in_fan_out=True),  # for nn.Linear PEFT sets it back to False, and so do we
], ids=["embedding-lora", "rank-alpha-patterns", "tied-modules-to-save", "head-saved", "fan-in-fan-out"])
def test_other_lora_layouts_merge_as_peft_does(tiny_checkpoints, tmp_path, case):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = tiny_checkpoints["tiny-gemma3"]
    torch.manual_seed(0)
    peft = get_peft_model(AutoModelForCausalLM.from_pretrained(base), LoraConfig(r=4, lora_alpha=8, **case))
    with torch.no_grad():  # B starts at zero: give every trainable tensor a value that shows
        for p in peft.parameters():
            if p.requires_grad:
                p.normal_(0.0, 0.05)
    peft.save_pretrained(tmp_path / "adapter")
    if case.get("fan_in_fan_out"):  # PEFT saved it as False already; as a GPT-2-minded config would have it
        config = tmp_path / "adapter" / "adapter_config.json"
        config.write_text(json.dumps({**json.loads(config.read_text()), "fan_in_fan_out": True}))
    ckpt = resolve(base, [tmp_path / "adapter"])
    theirs = peft_merged(base, tmp_path / "adapter").state_dict()
    ours = _ours(ckpt)
    assert ckpt.config.tie_word_embeddings == ("lm_head" not in case.get("modules_to_save", []))
    for hf, mine in weight_names(ckpt.config).items():
        assert torch.equal(ours[mine], theirs[hf]), hf


# ----------------------------------------------------------------------------------------------
# Exports of base + adapter, against PEFT.

@pytest.fixture(scope="module")
def adapter_export(fine_tunes):
    from export_cache import cached_export
    from gemma_edge.exporters.settings import ExportSettings

    def export(name: str, fmt: str, quant: str) -> Path:
        base, adapter = fine_tunes[name]
        return cached_export(resolve(base, [adapter]), ExportSettings(format=fmt, quant=quant, max_seq_len=MAX_SEQ_LEN,
                                                                       template="instruction"))
    return export


@pytest.mark.parametrize("quant", ["fp32", "int8"])
@pytest.mark.parametrize("fmt", ["onnx", "pte"])
@pytest.mark.parametrize("name", list(FAMILIES))
def test_an_exported_fine_tune_computes_what_peft_does(fine_tunes, adapter_export, name, fmt, quant):
    from gemma_edge.parity import reference_greedy
    from gemma_edge.runtime.backend import open_backend
    from gemma_edge.runtime.generator import Generator, open_export
    from gemma_edge.verify import golden_from_reference, verify

    base, adapter = fine_tunes[name]
    folder = adapter_export(name, fmt, quant)
    manifest = json.loads((folder / "gemma_edge.json").read_text())
    [entry] = manifest["adapters"]
    assert entry["sha256"] == resolve(base, [adapter]).adapters[0].sha256 and entry["name"] == adapter.name
    assert entry["rank"] == 8 and entry["use_rslora"] == (name == "tiny-gemma2")
    assert manifest["export"]["template"] == "instruction"

    text = [2] + _tokenizer(base).encode("\n\n".join(r["instruction"] + " " + r["response"] for r in DOLLY),
                                         add_special_tokens=False).ids
    backend = open_backend(folder)
    reference, untrained = peft_merged(base, adapter), peft_merged(base)
    report = verify(backend, golden_from_reference(reference, text[:49], 32, 8), quant)
    assert report.passed, report.to_dict()
    against_base = verify(backend, golden_from_reference(untrained, text[:49], 32, 8), quant)
    if quant == "fp32":
        assert not against_base.passed  # the export is the fine-tune, not the base
    assert against_base.checks[0].kl > 20 * max(report.checks[0].kl, 1e-4), (against_base.checks[0].kl, report.checks[0].kl)

    # The fine-tune's answers in its own prompt format: the manifest's template is chat's default.
    _, tokenizer = open_export(folder)
    gen = Generator(backend, tokenizer)
    for record in DOLLY[:3]:
        ids = _prompt_ids(base, record)
        want = reference_greedy(reference, ids, 8)
        got = gen.chat([{"role": "user", "content": record["instruction"], "context": record["context"] or None}],
                       max_new_tokens=8)
        assert gen.last.token_ids == want[:len(gen.last.token_ids)] and got.startswith(record["response"]), (got, record)


def test_the_command_line_takes_the_adapter_and_the_fine_tunes_format(fine_tunes, adapter_export, capsys):
    """check --adapter compares the merged model with transformers; generate answers in the prompt
    format the export recorded, without being told."""
    from gemma_edge.cli import main

    base, adapter = fine_tunes["tiny-gemma"]
    prompt = "Instruction:\nSay hello.\n\nResponse:\n"  # where the fine-tune is sure: no near-tie for greedy to flip on
    assert main(["check", str(base), "--adapter", str(adapter), "--max-seq-len", "64", "--new-tokens", "4",
                 "--prompt", prompt]) == 0
    capsys.readouterr()
    assert main(["generate", str(adapter_export("tiny-gemma", "onnx", "fp32")), DOLLY[1]["instruction"], "--json", "-n", "6"]) == 0
    assert json.loads(capsys.readouterr().out)["text"].startswith(DOLLY[1]["response"])


def test_verify_compares_an_adapter_export_with_base_plus_adapter(fine_tunes, adapter_export, tmp_path):
    """verify finds the adapter the manifest records, scores a dolly evaluation set's responses, and
    refuses an adapter that changed since the export."""
    from gemma_edge.cli import main

    # The cached export's manifest names the temporary folders of the run that made it: a copy names this run's.
    folder = tmp_path / "export"
    shutil.copytree(adapter_export("tiny-gemma", "onnx", "fp32"), folder)
    base, adapter = fine_tunes["tiny-gemma"]
    manifest = json.loads((folder / "gemma_edge.json").read_text())
    manifest["source"], manifest["adapters"][0]["path"] = str(base), str(adapter)
    (folder / "gemma_edge.json").write_text(json.dumps(manifest))
    prompts = tmp_path / "eval.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in DOLLY))
    report = tmp_path / "report.json"
    assert main(["verify", str(folder), "--prompts", str(prompts), "--prefill", "32", "--decode", "8", "--greedy", "8",
                 "--json", str(report)]) == 0
    data = json.loads(report.read_text())
    responses = data["responses"]
    assert data["passed"] and responses["examples"] == len(DOLLY) and responses["skipped"] == 0
    assert responses["tokens"] == sum(len(_tokenizer(base).encode(r["response"], add_special_tokens=False).ids) + 1
                                      for r in DOLLY)
    assert responses["ppl"] < 2.0 and abs(responses["ppl_ratio"] - 1) < 1e-3  # learned, and the export agrees

    # The same folder's manifest, pointing at an adapter whose weights changed since.
    changed = tmp_path / "changed"
    shutil.copytree(adapter, changed)
    manifest["adapters"][0]["path"] = str(changed)
    (folder / "gemma_edge.json").write_text(json.dumps(manifest))
    from safetensors.torch import load_file, save_file

    weights = load_file(changed / "adapter_model.safetensors")
    save_file({k: v * 1.01 for k, v in weights.items()}, changed / "adapter_model.safetensors")
    assert main(["verify", str(folder), "--no-verify-checksums"]) == 2
    shutil.rmtree(changed)
    assert main(["verify", str(folder), "--no-verify-checksums"]) == 2


# ----------------------------------------------------------------------------------------------
# Adapters that cannot be merged: named, with what to do.

def _adapter_copy(fine_tunes, tmp_path, name="tiny-gemma", **config) -> Path:
    folder = tmp_path / "adapter"
    shutil.copytree(fine_tunes[name][1], folder)
    path = folder / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **config}))
    return folder


@pytest.mark.parametrize("change, message", [
    (dict(use_dora=True), r"use_dora is set: DoRA"),
    (dict(peft_type="LOHA"), r"a LOHA adapter; gemma-edge merges LoRA adapters"),
    (dict(init_lora_weights="pissa"), r"init_lora_weights 'pissa' changes the base's weights"),
    (dict(target_modules=["c_attn", "q_proj"]), r"target_modules c_attn do not exist in this Gemma"),
    (dict(r=4), r"at rank 4 needs A \[4, \d+\] and B \[\d+, 4\]"),
])
def test_adapters_gemma_edge_cannot_merge_are_refused_by_name(fine_tunes, tmp_path, change, message):
    with pytest.raises(AdapterError, match=message):
        resolve(fine_tunes["tiny-gemma"][0], [_adapter_copy(fine_tunes, tmp_path, **change)])


def test_an_adapter_of_another_model_or_without_weights_is_refused(fine_tunes, tmp_path):
    base = fine_tunes["tiny-gemma"][0]
    with pytest.raises(AdapterError, match=r"adapts model.layers.3.mlp.down_proj, which the base \(gemma, 3 layers of "
                                           r"down_proj, .*\) does not have; was it trained on another model"):
        resolve(base, [fine_tunes["tiny-gemma3"][1]])  # trained on Gemma 3: 6 layers
    with pytest.raises(AdapterError, match=r"down_proj's LoRA pair is \[8, 136\] x \[64, 8\], but this base's "
                                           r"model.layers.0.mlp.down_proj of shape \[96, 200\] at rank 8 needs A \[8, 200\]"):
        resolve(fine_tunes["tiny-gemma3"][0], [fine_tunes["tiny-gemma"][1]])  # Gemma 1's widths on a Gemma 3
    folder = _adapter_copy(fine_tunes, tmp_path)
    (folder / "adapter_model.safetensors").rename(folder / "adapter_model.bin")
    with pytest.raises(AdapterError, match=r"no adapter_model.safetensors; it has adapter_model.bin, a pickle"):
        resolve(base, [folder])
    with pytest.raises(AdapterError, match=r"no such folder"):
        resolve(base, [tmp_path / "nowhere"])

    from gemma_edge.cli import main

    assert main(["export", str(base), "--adapter", str(tmp_path / "nowhere"), "--format", "onnx",
                 "-o", str(tmp_path / "out")]) == 2  # one line, exit 2, nothing written
    assert not (tmp_path / "out").exists()
