"""The Android app reads export manifests through fixtures (tests/data/manifests: the real Gemma 3
270M int4 in both formats) in its JVM tests. These tests keep the fixtures true: a fresh export has
every field the app reads (android_demo/.../ExportManifest.java), with the same values for the real
model and the same JSON types for every tiny family."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import REAL_MAX_SEQ_LEN
from export_cache import cached_export
from gemma_edge.exporters.settings import ExportSettings
from test_real_executorch import ALL_INT4

pytestmark = pytest.mark.slow  # exports (cached across runs)

FIXTURES = Path(__file__).parent / "data" / "manifests"
# Every manifest field ExportManifest.java reads, as paths into the JSON.
APP_FIELDS = [("gemma_edge_manifest",), ("format",), ("export", "quant"), ("config", "model_type"), ("config", "vocab_size"),
              ("max_seq_len",), ("special_tokens", "bos_token_id"), ("special_tokens", "stop_token_ids"), ("io", "program"),
              ("io", "files")]
APP_FILES = ["tokenizer.json"]  # besides io.files (the program and its weights)


def field(manifest: dict, path: tuple[str, ...]):
    for key in path:
        manifest = manifest[key]
    return manifest


def fixture(fmt: str) -> dict:
    return json.loads((FIXTURES / f"gemma-3-270m-int4-{fmt}.json").read_text())


def check_folder(folder: Path, manifest: dict) -> None:
    for name in [manifest["io"]["program"], *manifest["io"]["files"], *APP_FILES]:
        assert (folder / name).is_file(), f"{folder} lacks {name}, which the app opens"


@pytest.mark.parametrize("fmt", ["pte", "onnx"])
def test_the_fixtures_are_what_the_real_export_writes(fmt, real):
    # the all-int4 exports the real-model tests make: the .pte rounded by GPTQ, the ONNX to nearest (test_real_onnx.py)
    settings = ALL_INT4 if fmt == "pte" else ExportSettings(format=fmt, quant="int4", max_seq_len=REAL_MAX_SEQ_LEN, recipe="rtn")
    folder = cached_export(real[0], settings)
    fresh = json.loads((folder / "gemma_edge.json").read_text())
    for path in APP_FIELDS:
        assert field(fresh, path) == field(fixture(fmt), path), ".".join(path)
    check_folder(folder, fresh)


@pytest.mark.parametrize("name", ["tiny-gemma", "tiny-gemma-mha", "tiny-gemma2", "tiny-gemma3"])
@pytest.mark.parametrize("fmt", ["pte", "onnx"])
def test_every_family_has_the_fields_the_app_reads(name, fmt, tiny_exports):
    folder = tiny_exports(name, fmt, "int8")
    fresh = json.loads((folder / "gemma_edge.json").read_text())
    for path in APP_FIELDS:
        ours, theirs = field(fresh, path), field(fixture(fmt), path)
        assert type(ours) is type(theirs), ".".join(path)
    assert all(isinstance(i, int) for i in fresh["special_tokens"]["stop_token_ids"])
    check_folder(folder, fresh)
