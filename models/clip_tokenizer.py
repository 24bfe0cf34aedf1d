"""Build a real CLIP BPE tokenizer directory offline, from the merges file open_clip_torch ships.

OpenAI's CLIP vocabulary is fully determined by its BPE merges list: the 256-character byte
alphabet, the same characters with the end-of-word marker `</w>`, one token per merge and the two
special tokens. open_clip_torch's wheel carries that merges list (`bpe_simple_vocab_16e6.txt.gz`),
so `write_clip_tokenizer` can emit `vocab.json` / `merges.txt` / configs that
`transformers.CLIPTokenizer.from_pretrained(directory)` loads without touching a model hub.

open_clip is located with `importlib.util.find_spec`, never imported: it is installed with
`--no-deps` and its dependencies are absent. The derived vocab and merges are cached under
`${XDG_CACHE_HOME:-~/.cache}/driffusion-trt/clip-tokenizer/<sha256 of the source>/`.
"""
from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

SOURCE_PACKAGE = "open_clip"
SOURCE_FILE = "bpe_simple_vocab_16e6.txt.gz"
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
END_OF_WORD = "</w>"
VOCAB_SIZE = 49408
BOS_TOKEN_ID = VOCAB_SIZE - 2  # <|startoftext|>
EOS_TOKEN_ID = VOCAB_SIZE - 1  # <|endoftext|>
NUM_MERGES = 49152 - 256 - 2  # 48,894 merge lines follow the header line of the source file
MERGES_HEADER = "#version: 0.2"
CACHE_SUBDIR = Path("driffusion-trt") / "clip-tokenizer"


class TokenizerSourceError(RuntimeError):
    """The CLIP merges file (shipped by open_clip_torch) is missing or malformed."""


@dataclass(frozen=True)
class ClipBpe:
    """The derived tokenizer data: `vocab` maps token -> id, `merges` are "left right" lines."""

    vocab: dict[str, int]
    merges: list[str]


def source_path() -> Path:
    """The merges file inside the installed open_clip package (found without importing it)."""
    spec = importlib.util.find_spec(SOURCE_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    path = Path(locations[0]) / SOURCE_FILE if locations else None
    if path is None or not path.is_file():
        raise TokenizerSourceError(
            f"the CLIP BPE merges file {SOURCE_FILE} (shipped by open_clip_torch) was not found; "
            "run `make setup` (it installs open_clip_torch --no-deps)")
    return path


def byte_alphabet() -> list[str]:
    """GPT-2 style byte alphabet in vocabulary order: the printable bytes map to themselves
    (listed first, ascending), then the remaining bytes map to chr(256 + n) in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    printable_set = set(printable)
    others = [byte for byte in range(256) if byte not in printable_set]
    return [chr(byte) for byte in printable] + [chr(256 + n) for n in range(len(others))]


def read_merges(source: Path) -> list[str]:
    """The first NUM_MERGES merge lines of the gzipped source (its line 1 is a version header)."""
    lines = gzip.decompress(source.read_bytes()).decode("utf-8").split("\n")
    merges = lines[1:1 + NUM_MERGES]
    if len(merges) != NUM_MERGES or any(len(line.split(" ")) != 2 for line in merges):
        raise TokenizerSourceError(
            f"{source} does not hold {NUM_MERGES} 'left right' merge lines after its header; "
            "reinstall it: run `make setup` (it installs open_clip_torch --no-deps)")
    return merges


def derive_vocab(merges: list[str]) -> dict[str, int]:
    """Token -> id: byte alphabet, byte alphabet + `</w>`, one token per merge, BOS, EOS."""
    alphabet = byte_alphabet()
    tokens = [*alphabet, *(char + END_OF_WORD for char in alphabet)]
    tokens += [line.replace(" ", "") for line in merges]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    vocab = {token: index for index, token in enumerate(tokens)}
    if len(vocab) != VOCAB_SIZE:
        raise TokenizerSourceError(f"derived {len(vocab)} distinct tokens, expected {VOCAB_SIZE}")
    return vocab


def cache_root() -> Path:
    """`${XDG_CACHE_HOME:-~/.cache}/driffusion-trt/clip-tokenizer`."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / CACHE_SUBDIR


def sha256_of(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_atomic(path: Path, text: str) -> None:
    """Write `text` (utf-8) to `path` through a temp file in the same folder and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as handle:
            handle.write(text)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; the outputs are meant to be shared/mounted
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def vocab_json(vocab: dict[str, int]) -> str:
    """vocab.json text."""
    return json.dumps(vocab, ensure_ascii=False)


def merges_txt(merges: list[str]) -> str:
    """merges.txt text: the version header, then one merge per line."""
    return "\n".join([MERGES_HEADER, *merges]) + "\n"


def load_cached(entry: Path) -> ClipBpe | None:
    """The cached vocab/merges in `entry`, or None when absent or unreadable."""
    try:
        vocab = json.loads((entry / "vocab.json").read_text(encoding="utf-8"))
        lines = (entry / "merges.txt").read_text(encoding="utf-8").split("\n")
    except (OSError, ValueError):
        return None
    merges = [line for line in lines[1:] if line]
    if len(vocab) != VOCAB_SIZE or len(merges) != NUM_MERGES:
        return None
    return ClipBpe(vocab=vocab, merges=merges)


def store_cached(entry: Path, bpe: ClipBpe) -> None:
    """Cache `bpe` in `entry`; a cache that cannot be written is not an error."""
    try:
        write_atomic(entry / "merges.txt", merges_txt(bpe.merges))
        write_atomic(entry / "vocab.json", vocab_json(bpe.vocab))
    except OSError:
        pass


def clip_bpe() -> ClipBpe:
    """The CLIP vocab and merges: from the cache when present, else derived and cached."""
    source = source_path()
    entry = cache_root() / sha256_of(source)
    cached = load_cached(entry)
    if cached is not None:
        return cached
    merges = read_merges(source)
    bpe = ClipBpe(vocab=derive_vocab(merges), merges=merges)
    store_cached(entry, bpe)
    return bpe


def tokenizer_config(model_max_length: int, pad_token: str) -> dict[str, object]:
    """tokenizer_config.json contents for transformers' CLIPTokenizer."""
    return {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": model_max_length,
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "unk_token": EOS_TOKEN,
        "pad_token": pad_token,
        "do_lower_case": True,
        "errors": "replace",
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "model_input_names": ["input_ids", "attention_mask"],
    }


def special_tokens_map(pad_token: str) -> dict[str, str]:
    """special_tokens_map.json contents."""
    return {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "unk_token": EOS_TOKEN,
            "pad_token": pad_token}


def write_clip_tokenizer(directory: Path, *, model_max_length: int = 77,
                         pad_token: str = EOS_TOKEN) -> Path:
    """Write vocab.json, merges.txt, tokenizer_config.json and special_tokens_map.json into
    `directory` (created if needed) and return it; `CLIPTokenizer.from_pretrained(directory)`
    then loads offline. Raises TokenizerSourceError when open_clip_torch is not installed."""
    directory = Path(directory)
    bpe = clip_bpe()
    write_atomic(directory / "vocab.json", vocab_json(bpe.vocab))
    write_atomic(directory / "merges.txt", merges_txt(bpe.merges))
    write_atomic(directory / "tokenizer_config.json",
                 json.dumps(tokenizer_config(model_max_length, pad_token), indent=2) + "\n")
    write_atomic(directory / "special_tokens_map.json",
                 json.dumps(special_tokens_map(pad_token), indent=2) + "\n")
    return directory
