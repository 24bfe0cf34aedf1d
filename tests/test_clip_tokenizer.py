"""The offline CLIP tokenizer: derived from open_clip_torch's merges file, loaded by transformers."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from models import clip_tokenizer
from models.clip_tokenizer import (
    BOS_TOKEN,
    EOS_TOKEN,
    VOCAB_SIZE,
    TokenizerSourceError,
    write_clip_tokenizer,
)

if importlib.util.find_spec("open_clip") is None:
    pytest.skip("needs open_clip_torch's merges file: run `make setup` (installs it --no-deps)",
                allow_module_level=True)
transformers = pytest.importorskip("transformers", reason="needs transformers' CLIPTokenizer")

CAT_IDS = [49406, 320, 1125, 539, 320, 2368, 49407]
LONG_PROMPT = ", ".join(["a highly detailed photograph of a small orange cat"] * 20)


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point the derived-vocab cache at a fresh folder and keep transformers off the hub."""
    cache = tmp_path / "xdg-cache"
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    return cache


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tokenizer directory for the loading checks (its cache is a module-private folder)."""
    root = tmp_path_factory.mktemp("clip-tokenizer")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_CACHE_HOME", str(root / "xdg-cache"))
        return write_clip_tokenizer(root / "tokenizer")


def test_writes_the_four_files(tokenizer_dir: Path) -> None:
    names = {"vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"}
    assert names <= {path.name for path in tokenizer_dir.iterdir()}
    config = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "CLIPTokenizer"
    assert config["model_max_length"] == 77
    merges = (tokenizer_dir / "merges.txt").read_text().splitlines()
    assert merges[0] == "#version: 0.2"
    assert len(merges) == 1 + 49152 - 256 - 2


def test_vocab_layout(tokenizer_dir: Path) -> None:
    vocab = json.loads((tokenizer_dir / "vocab.json").read_text(encoding="utf-8"))
    assert len(vocab) == VOCAB_SIZE
    assert sorted(vocab.values()) == list(range(VOCAB_SIZE))
    assert vocab["!"] == 0 and vocab["!</w>"] == 256 and vocab["a</w>"] == 320
    assert vocab[chr(256)] == 188  # byte 0: first of the non-printable bytes, after 188 printable
    assert vocab[BOS_TOKEN] == 49406 and vocab[EOS_TOKEN] == 49407


def test_clip_tokenizer_ids(tokenizer_dir: Path) -> None:
    tokenizer = transformers.CLIPTokenizer.from_pretrained(tokenizer_dir)
    assert tokenizer("a photo of a cat").input_ids == CAT_IDS
    assert len(tokenizer) == VOCAB_SIZE
    assert tokenizer.model_max_length == 77
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (
        49406, 49407, 49407)


def test_long_prompt_truncates_to_77(tokenizer_dir: Path) -> None:
    tokenizer = transformers.CLIPTokenizer.from_pretrained(tokenizer_dir)
    ids = tokenizer(LONG_PROMPT, padding="max_length", max_length=77, truncation=True).input_ids
    assert len(ids) == 77
    assert ids[0] == 49406 and ids[-1] == 49407


def test_short_prompt_pads_with_eos(tokenizer_dir: Path) -> None:
    tokenizer = transformers.CLIPTokenizer.from_pretrained(tokenizer_dir)
    encoded = tokenizer("a photo of a cat", padding="max_length", max_length=77, truncation=True)
    assert encoded.input_ids == CAT_IDS + [49407] * (77 - len(CAT_IDS))
    assert sum(encoded.attention_mask) == len(CAT_IDS)


def test_fast_tokenizer_matches(tokenizer_dir: Path) -> None:
    try:
        fast = transformers.CLIPTokenizerFast.from_pretrained(tokenizer_dir)
    except (OSError, ValueError, ImportError) as error:
        pytest.skip(f"transformers cannot build CLIPTokenizerFast offline here: {error}")
    slow = transformers.CLIPTokenizer.from_pretrained(tokenizer_dir)
    for prompt in ("a photo of a cat", LONG_PROMPT, "Hello   WORLD's ünïcode 😀 123!"):
        expected = slow(prompt, truncation=True, max_length=77).input_ids
        assert fast(prompt, truncation=True, max_length=77).input_ids == expected
    assert fast("a photo of a cat").input_ids == CAT_IDS


def test_custom_length_and_pad(tmp_path: Path) -> None:
    directory = write_clip_tokenizer(tmp_path / "tok", model_max_length=32, pad_token="!")
    tokenizer = transformers.CLIPTokenizer.from_pretrained(directory)
    assert tokenizer.model_max_length == 32
    assert tokenizer.pad_token_id == 0
    ids = tokenizer("a cat", padding="max_length", max_length=8).input_ids
    assert ids == [49406, 320, 2368, 49407, 0, 0, 0, 0]


def test_derives_once_then_reuses_cache(tmp_path: Path, isolated_cache: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    first = write_clip_tokenizer(tmp_path / "first")
    entries = list((isolated_cache / "driffusion-trt" / "clip-tokenizer").iterdir())
    assert [entry.name for entry in entries] == [
        clip_tokenizer.sha256_of(clip_tokenizer.source_path())]
    assert {path.name for path in entries[0].iterdir()} == {"vocab.json", "merges.txt"}

    def no_derivation(_source: Path) -> list[str]:
        raise AssertionError("the cached copy should have been used")

    monkeypatch.setattr(clip_tokenizer, "read_merges", no_derivation)
    second = write_clip_tokenizer(tmp_path / "second")
    for name in ("vocab.json", "merges.txt"):
        assert (first / name).read_bytes() == (second / name).read_bytes()


def test_corrupt_cache_is_rederived(tmp_path: Path, isolated_cache: Path) -> None:
    write_clip_tokenizer(tmp_path / "first")
    entry = next((isolated_cache / "driffusion-trt" / "clip-tokenizer").iterdir())
    (entry / "vocab.json").write_text("{not json")
    directory = write_clip_tokenizer(tmp_path / "second")
    assert len(json.loads((directory / "vocab.json").read_text(encoding="utf-8"))) == VOCAB_SIZE
    assert len(json.loads((entry / "vocab.json").read_text(encoding="utf-8"))) == VOCAB_SIZE


def test_missing_source_names_the_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(clip_tokenizer.importlib.util, "find_spec", lambda _name: None)
    with pytest.raises(TokenizerSourceError, match="make setup"):
        write_clip_tokenizer(tmp_path / "tok")
    assert issubclass(TokenizerSourceError, RuntimeError)
    assert not (tmp_path / "tok").exists()
