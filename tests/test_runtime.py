"""The runtime: sampling on fixed logits, streamed UTF-8 text, stop rules, the cache's limits and
its reuse across chat turns, prompt formats, then every backend generating the same tokens as
transformers, the ONNX path without torch, and the CLI verbs through their entry point."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import byte_fallback_tokenizer, not_ours
from gemma_edge.errors import GemmaEdgeError
from gemma_edge.runtime import Generator, SamplingConfig
from gemma_edge.runtime.sampling import Sampler, probabilities
from gemma_edge.runtime.templates import template
from gemma_edge.runtime.tokenizer import StreamDecoder, Tokenizer

DATA = Path(__file__).parent / "data"
GEMMA_EDGE = str(Path(sys.executable).with_name("gemma-edge"))
SPECIAL = {"bos_token_id": 2, "eos_token_ids": [1], "end_of_turn_id": 5, "stop_token_ids": [1, 5]}
VOCAB = 1001


class ScriptedBackend:
    """Logits that make `sequence` the greedy continuation: forward_last(ids, start) picks
    sequence[start + len(ids)]. Records every call; refuses positions past the cache."""

    def __init__(self, sequence: list[int], max_seq_len: int = 64, can_rewind: bool = True):
        self.sequence, self.max_seq_len, self.can_rewind = sequence, max_seq_len, can_rewind
        self.manifest = {"config": {"vocab_size": VOCAB}, "max_seq_len": max_seq_len}
        self.calls: list[tuple[int, int]] = []  # (start, count)

    def forward(self, ids, start):
        assert start + len(ids) <= self.max_seq_len, "wrote past the cache"
        self.calls.append((start, len(ids)))
        rows = np.zeros((len(ids), VOCAB), np.float32)
        for i in range(len(ids)):
            rows[i, self.sequence[min(start + i + 1, len(self.sequence) - 1)]] = 10.0
        return rows

    def forward_last(self, ids, start):
        return self.forward(ids, start)[-1]

    def reset(self):
        self.calls.append((-1, 0))


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Tokenizer:
    folder = tmp_path_factory.mktemp("tok")
    byte_fallback_tokenizer(VOCAB).save(str(folder / "tokenizer.json"))
    return Tokenizer(folder, SPECIAL)


# Sampling, on fixed logits.

LOGITS = np.log(np.array([0.05, 0.4, 0.3, 0.15, 0.1]))


def test_greedy_and_top_k_1_pick_the_argmax():
    assert Sampler()(LOGITS) == 1
    assert all(Sampler(SamplingConfig(temperature=1.5, top_k=1, seed=s))(LOGITS) == 1 for s in range(20))


def test_seeded_sampling_is_reproducible_and_follows_the_distribution():
    config = SamplingConfig(temperature=1.0, seed=7)
    a, b = Sampler(config), Sampler(config)
    draws = [a(LOGITS) for _ in range(4000)]
    assert draws == [b(LOGITS) for _ in range(4000)]
    other = Sampler(SamplingConfig(temperature=1.0, seed=8))
    assert [other(LOGITS) for _ in range(50)] != draws[:50]  # another seed, other draws
    freq = np.bincount(draws, minlength=5) / len(draws)
    np.testing.assert_allclose(freq, np.exp(LOGITS), atol=0.03)  # temperature 1: the model's own distribution


def test_temperature_top_k_top_p_shape_the_distribution():
    p = np.exp(LOGITS)
    np.testing.assert_allclose(probabilities(LOGITS, SamplingConfig(temperature=1.0)), p, rtol=1e-9)
    sharp = probabilities(LOGITS, SamplingConfig(temperature=0.5))
    np.testing.assert_allclose(sharp, p ** 2 / (p ** 2).sum(), rtol=1e-9)  # T=0.5 squares, renormalized
    top2 = probabilities(LOGITS, SamplingConfig(temperature=1.0, top_k=2))
    np.testing.assert_allclose(top2, [0, 0.4 / 0.7, 0.3 / 0.7, 0, 0], rtol=1e-9)
    # top-p 0.75: 0.4 + 0.3 = 0.7 < 0.75, so the token crossing it (0.15) is kept too
    nucleus = probabilities(LOGITS, SamplingConfig(temperature=1.0, top_p=0.75))
    np.testing.assert_allclose(nucleus, [0, 0.4 / 0.85, 0.3 / 0.85, 0.15 / 0.85, 0], rtol=1e-9)


def test_repetition_penalty_lowers_tokens_already_seen():
    logits = np.array([1.0, 2.0, -1.0, 1.9])
    assert Sampler()(logits, context=[1]) == 1
    assert Sampler(SamplingConfig(repetition_penalty=1.2))(logits, context=[1]) == 3  # 2.0 / 1.2 < 1.9
    assert Sampler(SamplingConfig(repetition_penalty=1.2))(np.array([-1.0, -1.1]), context=[0]) == 1  # -1.2 < -1.1


@pytest.mark.parametrize("bad, message", [({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p"),
                                          ({"top_k": -2}, "top_k"), ({"repetition_penalty": 0}, "repetition_penalty")])
def test_bad_sampling_settings_say_which(bad, message):
    with pytest.raises(GemmaEdgeError, match=message):
        SamplingConfig(**bad)


# Text: streaming whole characters, stop strings.

def test_stream_decoder_never_releases_half_a_character(tokenizer):
    ids = tokenizer.encode("the café déjà vu, naïve ☃!")
    decoder = StreamDecoder(tokenizer)
    pieces = [decoder.add(i) for i in ids] + [decoder.flush()]
    assert "".join(pieces) == tokenizer.decode(ids) == "the café déjà vu, naïve ☃!"
    assert not any("\ufffd" in p for p in pieces)
    assert "" in pieces  # some ids (the first byte of é) released nothing yet


def test_a_sentencepiece_folder_streams_the_same(tmp_path):
    """A folder with tokenizer.model only (SentencePiece, byte fallback), as older Gemma checkpoints ship."""
    import sentencepiece as spm
    import pydoc_data.topics

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(list(pydoc_data.topics.topics.values())[:40]))
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "tokenizer"), vocab_size=400,
                                   model_type="bpe", byte_fallback=True, pad_id=0, eos_id=1, bos_id=2, unk_id=3,
                                   user_defined_symbols=["<start_of_turn>", "<end_of_turn>"], character_coverage=1.0,
                                   minloglevel=2)
    tok = Tokenizer(tmp_path, SPECIAL)
    ids = tok.encode("the café ☃ works<end_of_turn>", bos=True)
    assert ids[0] == 2 and ids[-1] == 5 and tok.token_id("<end_of_turn>") == 5
    assert tok.decode(ids) == "the café ☃ works"  # <bos> and the turn marker are no text
    decoder = StreamDecoder(tok)
    pieces = [decoder.add(i) for i in ids] + [decoder.flush()]
    assert "".join(pieces) == "the café ☃ works" and not any("\ufffd" in p for p in pieces)


def test_invalid_bytes_from_the_model_never_take_back_released_text(tokenizer):
    """A random model may emit "U" then a lone continuation byte: a whole-list decode turns the
    already shown "U" into U+FFFD too; the stream keeps what it showed and goes on."""
    byte = lambda b: 6 + b  # <0x00> is id 6 in this vocabulary
    ids = [byte(0x55), byte(0x55), byte(0xA9), byte(0xA9)] + tokenizer.encode("zz")  # "U" "U", then no UTF-8
    assert tokenizer.decode(ids) == "\ufffd" * 4 + "zz"  # the whole list: the shown "UU" rewritten
    decoder = StreamDecoder(tokenizer)
    pieces = [decoder.add(i) for i in ids] + [decoder.flush()]
    assert pieces[:2] == ["U", "U"] and "".join(pieces) == decoder.text == "UU\ufffd\ufffdzz"


def test_streamed_text_equals_generated_text(tokenizer):
    prompt = tokenizer.encode("the ", bos=True)
    sequence = prompt + tokenizer.encode("café ☃ déjà vu") + [5]
    gen = Generator(ScriptedBackend(sequence), tokenizer)
    pieces = list(gen.stream(prompt, 40))
    assert "".join(pieces) == gen.generate(prompt, 40) == "café ☃ déjà vu"
    assert not any("\ufffd" in p for p in pieces) and len(pieces) > 5
    assert gen.last.finish_reason == "stop" and gen.last.token_ids[-1] == 5  # <end_of_turn> stops, no text


def test_stop_strings_end_the_text_before_them(tokenizer):
    prompt = tokenizer.encode("Q", bos=True)
    sequence = prompt + tokenizer.encode(": one. STOP here") + [1]
    gen = Generator(ScriptedBackend(sequence), tokenizer)
    pieces = list(gen.stream(prompt, 40, stop=["STOP"]))
    assert "".join(pieces) == ": one. " and gen.last.finish_reason == "stop"
    assert all("S" not in p for p in pieces)  # the stop string's start was held back, never shown
    assert gen.generate(prompt, 40, stop=["STOX"]) == ": one. STOP here"  # a partial match is released at the end


# The cache: limits and reuse.

def test_a_prompt_longer_than_the_cache_is_an_error_or_truncated_from_the_left(tokenizer):
    sequence = list(range(10, 90))
    gen = Generator(ScriptedBackend(sequence, max_seq_len=16), tokenizer)
    with pytest.raises(GemmaEdgeError, match="20 tokens but the cache holds 16.*truncate"):
        gen.generate([2] + sequence[:19], 4)
    backend = gen.backend
    backend.calls.clear()
    gen.generate([2] + sequence[:5], 2)  # after a refused prompt nothing is taken as cached
    assert backend.calls[1] == (0, 6) and gen.last.stats.cached_tokens == 0
    gen.generate([2] + sequence[:19], 1, truncate="left")
    assert gen.last.stats.prompt_tokens == 15  # <bos> kept, then the last 14: room for one new token


def test_generation_that_fills_the_cache_stops_with_length(tokenizer):
    backend = ScriptedBackend(list(range(10, 90)), max_seq_len=16)
    gen = Generator(backend, tokenizer)
    gen.generate(list(range(10, 20)), 100)
    assert gen.last.finish_reason == "length" and gen.last.stats.generated_tokens == 7  # positions 10..15, then one drawn
    assert max(s + n for s, n in backend.calls) == 16  # never past the cache (the backend asserts too)


def test_chat_turns_reuse_the_cache(tokenizer):
    turn1 = [{"role": "user", "content": "Hi"}]
    ids1 = [2] + [i for s in template("gemma")(turn1) for i in tokenizer.encode(s)]
    reply = tokenizer.encode("Hello there")
    turn2 = turn1 + [{"role": "assistant", "content": "Hello there"}, {"role": "user", "content": "Bye"}]
    ids2 = [2] + [i for s in template("gemma")(turn2) for i in tokenizer.encode(s)]
    backend = ScriptedBackend(ids1 + reply + [5] + ids2[len(ids1) + len(reply) + 1:] + tokenizer.encode("Ciao") + [5], 128)
    gen = Generator(backend, tokenizer)
    assert gen.chat(turn1) == "Hello there"
    backend.calls.clear()
    assert gen.chat(turn2) == "Ciao"
    start, count = backend.calls[0]
    assert start == len(ids1) + len(reply) and gen.last.stats.cached_tokens == start  # only the new turn computed
    assert start + count == len(ids2)


def test_a_ring_cache_is_reused_only_by_appending(tokenizer):
    backend = ScriptedBackend(list(range(10, 90)), can_rewind=False)
    gen = Generator(backend, tokenizer)
    gen.generate(list(range(10, 20)), 3)
    backend.calls.clear()
    gen.generate(list(range(10, 15)), 3)  # a prefix of what the cache holds: would need to go back
    assert backend.calls[0] == (-1, 0) and backend.calls[1] == (0, 5)


@pytest.mark.parametrize("case", json.loads((DATA / "prompt_formats.json").read_text())["cases"])
def test_prompt_formats(case):
    assert template(case["template"])(case["messages"]) == case["segments"]


def test_unknown_template_and_bad_messages_are_clear():
    with pytest.raises(GemmaEdgeError, match="unknown template 'llama'; valid: gemma, instruction, plain"):
        template("llama")
    with pytest.raises(GemmaEdgeError, match="a message must be"):
        template("gemma")([{"role": "bot", "content": "x"}])


# Every backend, the same tokens as transformers.

FAMILIES = ["tiny-gemma", "tiny-gemma-mha", "tiny-gemma2", "tiny-gemma3"]
MAX_SEQ_LEN = 64


@pytest.fixture(scope="module")
def fp32_exports(tiny_exports):
    return {(name, fmt): tiny_exports(name, fmt, "fp32") for name in FAMILIES for fmt in ("onnx", "pte")}


@pytest.mark.slow
@pytest.mark.parametrize("name", FAMILIES)
def test_every_backend_generates_what_transformers_generates(name, fp32_exports, tiny_with_tokenizers):
    from transformers import AutoModelForCausalLM

    from gemma_edge.checkpoints import load_model
    from gemma_edge.runtime.eager import EagerBackend

    folder = tiny_with_tokenizers[name]
    prompt = "the cat sat on the mat"
    onnx_gen = Generator.load(fp32_exports[(name, "onnx")])
    ids = onnx_gen.tokenizer.encode(prompt, bos=True)
    reference = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()
    from transformers import GenerationConfig

    config = GenerationConfig(max_new_tokens=32, do_sample=False, eos_token_id=None, pad_token_id=0)
    with torch.no_grad():  # no stop ids on either side: 32 tokens whatever they are
        expected = reference.generate(torch.tensor([ids]), generation_config=config)[0, len(ids):].tolist()
    assert len(expected) == 32
    eager = Generator(EagerBackend(load_model(folder, MAX_SEQ_LEN)), onnx_gen.tokenizer)
    for gen in (onnx_gen, Generator.load(fp32_exports[(name, "pte")]), eager):
        gen.generate(ids, 32, ignore_eos=True)
        assert gen.last.token_ids == expected, type(gen.backend).__name__


@pytest.mark.slow
def test_the_onnx_path_needs_no_torch(fp32_exports):
    """A device-side install is onnxruntime + numpy + tokenizers: generation and the CLI run with
    the torch import blocked."""
    folder = fp32_exports[("tiny-gemma3", "onnx")]
    expected = Generator.load(folder)
    text = expected.generate("the cat", 24)
    script = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'torch' or name.startswith('torch.'):\n"
        "            raise ImportError('torch is blocked in this test')\n"
        "sys.meta_path.insert(0, Block())\n"
        "from gemma_edge.runtime import Generator\n"
        "gen = Generator.load(sys.argv[1])\n"
        "print(repr((gen.generate('the cat', 24), gen.last.token_ids)))\n"
        "assert 'torch' not in sys.modules\n"
        "from gemma_edge.cli import main\n"
        "sys.exit(main(['generate', sys.argv[1], 'the cat', '-n', '24', '--json']))\n")
    result = subprocess.run([sys.executable, "-c", script, str(folder)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    first, cli = result.stdout.strip().split("\n")
    assert first == repr((text, expected.last.token_ids))
    assert json.loads(cli)["token_ids"] == expected.last.token_ids


# The CLI verbs.

def run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([GEMMA_EDGE, *args], capture_output=True, text=True, timeout=600, input=stdin)


def test_pages_of_a_mapped_weight_file_are_given_back_and_read_again(tmp_path):
    """What the ONNX backend does with model.onnx.data once ONNX Runtime has repacked its weights
    (onnx_backend.pages_released_while_loading): the resident pages of the file's mappings are given
    back, and reading them again reads the same bytes."""
    import mmap

    from gemma_edge.runtime.backend import release_mapped_pages

    def resident_mib(path: Path) -> float:
        """The resident pages of this process's mappings of path (/proc/self/smaps). The process's whole
        RssFile, measured here until 2026-12-06, counts every file's pages: a cold CI run saw 56 of
        these 64 MiB given back by it, once."""
        total, ours = 0, False
        for line in open("/proc/self/smaps"):
            if line[0] in "0123456789abcdef" and " " in line and "-" in line.split()[0]:  # a mapping's header
                ours = line.rstrip().endswith(" " + str(path.resolve()))
            elif ours and line.startswith("Rss:"):
                total += int(line.split()[1])
        return total / 1024

    path = tmp_path / "model.onnx.data"
    content = np.random.default_rng(0).integers(0, 255, 64 << 20, dtype=np.uint8)
    path.write_bytes(content.tobytes())
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        view = np.frombuffer(mapped, dtype=np.uint8)
        checksum = int(view.sum(dtype=np.uint64))  # every page read: resident
        before = resident_mib(path)
        assert release_mapped_pages(path) >= 1
        after = resident_mib(path)
        assert before > 63 and after < 1, (before, after)  # 64 MiB given back
        assert int(view.sum(dtype=np.uint64)) == checksum == int(content.sum(dtype=np.uint64))
        del view
    assert release_mapped_pages(tmp_path / "not-mapped") == 0


@pytest.mark.parametrize("verb", ["generate", "chat", "inspect"])
def test_help(verb):
    result = run(verb, "--help")
    assert result.returncode == 0 and f"usage: gemma-edge {verb}" in result.stdout


@pytest.mark.slow
def test_generate_prints_text_or_one_json_object(fp32_exports):
    folder = str(fp32_exports[("tiny-gemma2", "onnx")])
    gen = Generator.load(folder)
    expected = gen.generate("the cat", 12)
    text = run("generate", folder, "the cat", "-n", "12")
    assert text.returncode == 0 and text.stdout == expected + "\n" and "decode" in text.stderr
    assert not_ours(text.stderr) == []  # our lines only: the libraries' are filtered
    out = run("generate", folder, "the cat", "-n", "12", "--json")
    data = json.loads(out.stdout)  # exactly one object: json.loads refuses anything after it
    assert data["text"] == expected and data["token_ids"] == gen.last.token_ids and data["finish_reason"] == "length"
    assert {"prompt_tokens", "generated_tokens", "ttft_s", "prefill_tokens_per_s", "decode_tokens_per_s"} <= set(data["stats"])
    sampled = [json.loads(run("generate", folder, "the cat", "-n", "12", "--json", "--temperature", "0.9",
                              "--seed", "4").stdout)["token_ids"] for _ in range(2)]
    assert sampled[0] == sampled[1]
    bad = run("generate", folder, "the cat", "--top-p", "0")
    assert bad.returncode == 2 and "top_p must be in (0, 1]" in bad.stderr and "Traceback" not in bad.stderr
    missing = run("generate", "/no/such/export", "x")
    assert missing.returncode == 2 and "gemma_edge.json" in missing.stderr


@pytest.mark.slow
def test_chat_streams_replies_and_resets(fp32_exports):
    folder = str(fp32_exports[("tiny-gemma3", "onnx")])
    gen = Generator.load(folder)
    first = gen.chat([{"role": "user", "content": "hi"}], 8)
    assert first.strip()  # a reply to find in the output
    result = run("chat", folder, "-n", "8", "--verbose", stdin="hi\n/reset\nhi\n/quit\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count(first + "\n") == 2  # the same reply after /reset
    assert "conversation forgotten" in result.stderr and result.stderr.count("finish:") == 2


@pytest.mark.slow
def test_inspect_shows_the_manifest_and_catches_a_changed_file(fp32_exports, tmp_path):
    import shutil

    folder = tmp_path / "export"
    shutil.copytree(fp32_exports[("tiny-gemma", "onnx")], folder)
    ok = run("inspect", str(folder))
    assert ok.returncode == 0 and "onnx" in ok.stdout and "model.onnx" in ok.stdout and "CHANGED" not in ok.stdout
    # what a device needs: the program's weights, the KV cache at max_seq_len, their sum (MiB, one decimal)
    manifest = json.loads((folder / "gemma_edge.json").read_text())
    weights, cache = manifest["files"]["model.onnx"]["bytes"] / 2**20, manifest["cache"]["bytes"] / 2**20
    assert cache == 2 * 3 * 1 * manifest["max_seq_len"] * 24 * 4 / 2**20  # tiny-gemma: 3 layers, 1 kv head of 24, float32
    expected = f"weights {weights:,.1f} MiB + KV cache {cache:,.1f} MiB (float32, {manifest['max_seq_len']} positions) = {weights + cache:,.1f} MiB"
    assert expected in " ".join(ok.stdout.split()), ok.stdout
    data = bytearray((folder / "model.onnx").read_bytes())
    data[-100] ^= 1
    (folder / "model.onnx").write_bytes(bytes(data))
    bad = run("inspect", str(folder))
    assert bad.returncode == 1 and "CHANGED" in bad.stdout and "do not match" in bad.stdout
