"""Tokenizers: byte-level for our tiny models, and an HF `tokenizer.json` through the `tokenizers` package
(no hub access: the file must be in the checkpoint directory)."""

from __future__ import annotations

import os
from typing import Optional, Sequence


class ByteTokenizer:
    """UTF-8 bytes shifted past the special tokens: pad 0, bos 1, eos 2, byte b -> b + 3 (vocab 259)."""

    pad_id, bos_id, eos_id = 0, 1, 2
    offset = 3
    vocab_size = 256 + offset

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        ids = [b + self.offset for b in text.encode("utf-8")]
        return [self.bos_id] + ids if add_bos else ids

    def decode(self, ids: Sequence[int]) -> str:
        data = bytes(int(i) - self.offset for i in ids if self.offset <= int(i) < self.offset + 256)
        return data.decode("utf-8", errors="replace")


class HFTokenizer:
    """Wraps tokenizers.Tokenizer loaded from DIR/tokenizer.json."""

    def __init__(self, path: str, bos_id: Optional[int] = None, eos_id: Optional[int] = None):
        from tokenizers import Tokenizer

        file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
        self.tok = Tokenizer.from_file(file)
        self.bos_id, self.eos_id = bos_id, eos_id
        self.vocab_size = self.tok.get_vocab_size()

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        ids = self.tok.encode(text, add_special_tokens=False).ids
        return [self.bos_id] + ids if add_bos and self.bos_id is not None else ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=True)


def load_tokenizer(model_dir: Optional[str], bos_id: Optional[int] = None, eos_id: Optional[int] = None,
                   tokenizer: str = "auto"):
    """The tokenizer of a model directory. tokenizer: 'auto' (the directory's tokenizer.json; a nemojax model
    directory without one was trained on bytes, so the byte-level tokenizer; an HF checkpoint without one is an
    error, not a silent byte-level fallback that would print garbage), 'byte', or a tokenizer.json file or a
    directory holding one."""
    if tokenizer == "byte":
        return ByteTokenizer()
    if tokenizer != "auto":
        file = os.path.join(tokenizer, "tokenizer.json") if os.path.isdir(tokenizer) else tokenizer
        if not os.path.isfile(file):
            raise FileNotFoundError(f"tokenizer {tokenizer!r}: no such tokenizer.json (expected 'auto', 'byte', a "
                                    f"tokenizer.json file or a directory holding one)")
        return HFTokenizer(file, bos_id, eos_id)
    if model_dir and os.path.isfile(os.path.join(model_dir, "tokenizer.json")):
        return HFTokenizer(model_dir, bos_id, eos_id)
    if model_dir is None or os.path.isfile(os.path.join(model_dir, "nemojax_config.json")):
        return ByteTokenizer()
    raise FileNotFoundError(f"{model_dir} has no tokenizer.json: copy the checkpoint's tokenizer files into it, "
                            f"or name a tokenizer with --tokenizer PATH (or --tokenizer byte for a byte-level model)")
