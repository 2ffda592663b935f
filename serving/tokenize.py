"""Text -> backbone inputs with a Hugging Face fast tokenizer, as the `tokenizer` Triton model runs it.

Uses the light `tokenizers` library on the exported `tokenizer/tokenizer.json`. Truncation to the
export's max_length (longest-first for pairs) and padding to the longest sequence in the batch
override whatever the saved tokenizer.json presets (save_pretrained stores fixed-length padding).

Bounds: a text above `max_bytes` UTF-8 bytes is rejected before it is decoded (the model reads only
max_length tokens; megabytes of text would hold the single tokenizer instance for seconds), and a
text that leaves no token of its own after normalization (a zero-width space, NUL, BOM, U+FFFD, a
lone combining mark: only [CLS]/[SEP] would remain) is rejected instead of getting a confident label.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from serving.errors import InputError

TOKENIZER_JSON = "tokenizer.json"

# Backbone input name -> the tokenizers.Encoding attribute that holds it.
_ENCODING_FIELDS = {"input_ids": "ids", "attention_mask": "attention_mask", "token_type_ids": "type_ids"}


def decode_texts(raw: np.ndarray, name: str, max_bytes: int | None = None) -> list[str]:
    """A (B, 1) TYPE_STRING tensor -> B Python strings; empty, oversized or non-UTF-8 elements are InputErrors."""
    if raw.ndim != 2 or raw.shape[1] != 1:
        raise InputError(f"{name} must have shape (batch, 1), got {tuple(raw.shape)}")
    texts = []
    for i, item in enumerate(raw[:, 0]):
        size = len(item.encode("utf-8")) if isinstance(item, str) else len(item) if isinstance(item, bytes) else 0
        if max_bytes is not None and size > max_bytes:
            raise InputError(
                f"{name}[{i}] is {size} bytes; the limit is {max_bytes} UTF-8 bytes per text "
                "(serve.max_text_bytes): the model reads only its first max_length tokens, send less"
            )
        if isinstance(item, (bytes, np.bytes_)):
            try:
                item = bytes(item).decode("utf-8")
            except UnicodeDecodeError as e:
                raise InputError(f"{name}[{i}] is not valid UTF-8 ({e.reason} at byte {e.start})") from None
        if not isinstance(item, str):
            raise InputError(f"{name}[{i}] must be a string, got {type(item).__name__}")
        if not item.strip():
            raise InputError(f"{name}[{i}] is empty")
        texts.append(item)
    return texts


def _pad_token(tokenizer: Tokenizer, directory: Path) -> tuple[int, str]:
    """The pad token from tokenizer.json's padding preset, else tokenizer_config.json's pad_token."""
    if tokenizer.padding:
        return tokenizer.padding["pad_id"], tokenizer.padding["pad_token"]
    config = directory / "tokenizer_config.json"
    token = json.loads(config.read_text()).get("pad_token") if config.is_file() else None
    token_id = tokenizer.token_to_id(token) if isinstance(token, str) else None
    if token_id is None:
        raise ValueError(
            f"{directory}: the tokenizer defines no pad token (tokenizer.json padding or tokenizer_config.json pad_token)"
        )
    return token_id, token


def _check_content(sequence_ids: list, row: int, pair: bool) -> None:
    """InputError unless the text (and pair) kept a token of its own: None marks special and padding tokens."""
    for side, name in ((0, "text"), (1, "text_pair"))[: 2 if pair else 1]:
        if side not in sequence_ids:
            raise InputError(
                f"{name}[{row}] has no content: nothing is left after tokenization but special tokens "
                "(it holds only invisible, control or combining characters such as a zero-width space, "
                "NUL, a byte-order mark or U+FFFD)"
            )


class TextTokenizer:
    """Encode texts (and optional pairs) into the int64 (B, T) arrays the backbone takes."""

    def __init__(self, directory: str | Path, max_length: int, output_names: tuple[str, ...]):
        directory = Path(directory)
        path = directory / TOKENIZER_JSON
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} is missing: the export's tokenizer/ must hold a fast tokenizer (save_pretrained)"
            )
        unknown = [n for n in output_names if n not in _ENCODING_FIELDS]
        if unknown:
            raise ValueError(
                f"the backbone takes {unknown}, which a tokenizer cannot produce (known: {list(_ENCODING_FIELDS)})"
            )
        self.tokenizer = Tokenizer.from_file(str(path))
        pad_id, pad_token = _pad_token(self.tokenizer, directory)
        self.tokenizer.enable_truncation(max_length=max_length, strategy="longest_first")
        self.tokenizer.enable_padding(pad_id=pad_id, pad_token=pad_token, length=None)
        self.max_length = max_length
        self.output_names = tuple(output_names)

    def __call__(self, texts: list[str], pairs: list[str] | None = None) -> dict[str, np.ndarray]:
        if pairs is not None and len(pairs) != len(texts):
            raise InputError(f"got {len(texts)} texts but {len(pairs)} text pairs")
        batch = list(zip(texts, pairs)) if pairs is not None else list(texts)
        encodings = self.tokenizer.encode_batch(batch)
        for i, e in enumerate(encodings):
            _check_content(e.sequence_ids, i, pairs is not None)
        return {
            name: np.array([getattr(e, _ENCODING_FIELDS[name]) for e in encodings], dtype=np.int64)  # (B, T)
            for name in self.output_names
        }
