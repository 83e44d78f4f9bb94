"""What a model folder's tokenizer and generation config say about its ids, read from those files alone.

- :func:`tokenizer_identity`: a fingerprint of the vocabulary (token -> id) and the special tokens, and
  the tokenizer's length (its real vocabulary: the ids ``0 .. len - 1`` it can produce). Two models with
  equal fingerprints map text to the same ids even when their embedding matrices are padded to different
  sizes (``config.vocab_size``: Qwen2.5-7B pads to 152064, Qwen2.5-1.5B to 151936, both tokenizers 151665).
- :func:`check_same_tokenizer`: the student/teacher check preflight runs before any model loads. Folders
  whose tokenizer files are the same bytes need no tokenizer loaded (transformers' import alone takes
  seconds, before the first child of `gkd train` could start): the embeddings are checked against an
  upper bound of the tokenizer's length read from its JSON files, and only a folder below that bound is
  loaded for the exact length.
- :func:`real_vocab_size`: what the engines restrict their ids to (a teacher's top-k never names a padded
  row, a rollout never samples one), so the loss never sees an id beyond the smaller model's vocabulary.
- :func:`stop_token_ids`: every id of ``generation_config.eos_token_id`` (an int or a list: Qwen, Llama 3 and
  Gemma end a turn with another token than the tokenizer's eos) plus the tokenizer's eos.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "TokenizerIdentity",
    "check_same_tokenizer",
    "generation_eos_ids",
    "real_vocab_size",
    "stop_token_ids",
    "tokenizer_identity",
]

#: Files of a folder that hold a tokenizer (any one is enough for transformers' AutoTokenizer).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


@dataclass(frozen=True)
class TokenizerIdentity:
    fingerprint: str  # "sha256:<16 hex>" of the vocabulary and the special tokens
    length: int  # len(tokenizer): ids 0 .. length - 1 are real tokens


def has_tokenizer(folder: str | Path) -> bool:
    folder = Path(folder)
    return folder.is_dir() and any((folder / f).is_file() for f in TOKENIZER_FILES)


def load_tokenizer(folder: str | Path):
    """The folder's tokenizer (reads the tokenizer files only, never the weights)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))


def tokenizer_identity(folder: str | Path | None = None, *, tokenizer=None) -> TokenizerIdentity:
    """The identity of ``folder``'s tokenizer (or of ``tokenizer``, already loaded)."""
    tok = tokenizer if tokenizer is not None else load_tokenizer(folder)
    vocab = sorted(tok.get_vocab().items())
    special = sorted(
        (int(i), str(t)) for i, t in getattr(tok, "added_tokens_decoder", {}).items() if t.special
    )
    blob = json.dumps({"vocab": vocab, "special": special}, ensure_ascii=False).encode()
    return TokenizerIdentity("sha256:" + hashlib.sha256(blob).hexdigest()[:16], len(tok))


def _config_vocab_size(folder: Path) -> int | None:
    """``vocab_size`` of ``folder/config.json`` (or of its ``text_config``), None where there is none."""
    try:
        cfg = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return None
    value = cfg.get("vocab_size", (cfg.get("text_config") or {}).get("vocab_size"))
    return int(value) if isinstance(value, int) else None


def _identity(folder, key: str) -> TokenizerIdentity:
    try:
        return tokenizer_identity(folder)
    except (OSError, ValueError, KeyError, TypeError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{key}={folder}: cannot read its tokenizer ({reason})") from e


#: The files AutoTokenizer builds a tokenizer from; two folders holding the same bytes in each (and the same
#: ones missing) load the same vocabulary and special tokens.
_DEFINING_FILES = (
    *TOKENIZER_FILES,
    "vocab.txt",
    "merges.txt",
    "special_tokens_map.json",
    "added_tokens.json",
)


def _same_tokenizer_files(a: Path, b: Path) -> bool:
    for name in _DEFINING_FILES:
        fa, fb = a / name, b / name
        if fa.is_file() != fb.is_file():
            return False
        if fa.is_file() and (fa.stat().st_size != fb.stat().st_size or fa.read_bytes() != fb.read_bytes()):
            return False
    return (a / "tokenizer.json").is_file()


def _length_bound(folder: Path) -> int | None:
    """At least ``len(tokenizer)``, from ``tokenizer.json`` and the special-token files alone: one past the
    largest id they name, plus one for every special token named only by its text (transformers would add
    it). None when the files do not parse as expected."""
    try:
        spec = json.loads((folder / "tokenizer.json").read_text())
        vocab = spec["model"]["vocab"]
        ids = list(vocab.values()) if isinstance(vocab, dict) else list(range(len(vocab)))
        known = set(vocab) if isinstance(vocab, dict) else {str(v[0]) for v in vocab}
        for tok in spec.get("added_tokens") or []:
            ids.append(int(tok["id"]))
            known.add(str(tok["content"]))
        named = set()
        for name in ("tokenizer_config.json", "special_tokens_map.json"):
            path = folder / name
            data = json.loads(path.read_text()) if path.is_file() else {}
            ids += [int(i) for i in data.get("added_tokens_decoder") or {}]
            for key, value in data.items():
                if key.endswith("_token") or key == "additional_special_tokens":
                    for v in value if isinstance(value, list) else [value]:
                        text = v.get("content") if isinstance(v, dict) else v
                        if isinstance(text, str):
                            named.add(text)
        return max(ids, default=-1) + 1 + len(named - known)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def check_same_tokenizer(
    student: str | Path, teacher: str | Path, student_key: str, teacher_key: str
) -> None:
    """Raise ``ValueError`` (one line naming both folders) unless the two folders' tokenizers have the same
    vocabulary and special tokens, and each model's embedding has a row for every token. Different
    ``config.vocab_size`` (embedding padding) is fine: the engines keep to the tokenizer's ids. Same
    tokenizer files and embeddings above :func:`_length_bound`: decided without loading a tokenizer."""
    if _same_tokenizer_files(Path(student), Path(teacher)):
        bound = _length_bound(Path(student))
        rows = [_config_vocab_size(Path(f)) for f in (student, teacher)]
        if bound is not None and all(r is None or r >= bound for r in rows):
            return
    s_id, t_id = _identity(student, student_key), _identity(teacher, teacher_key)
    if s_id.fingerprint != t_id.fingerprint:
        raise ValueError(
            f"{student_key}={student} and {teacher_key}={teacher} have different tokenizers "
            f"({s_id.fingerprint}, {s_id.length} tokens vs {t_id.fingerprint}, {t_id.length} tokens): "
            "distillation needs the student's tokenizer on the teacher; pick a teacher of the same family"
        )
    for key, folder in ((student_key, Path(student)), (teacher_key, Path(teacher))):
        rows = _config_vocab_size(folder)
        if rows is not None and rows < s_id.length:
            raise ValueError(
                f"{key}={folder}: config.json vocab_size {rows} is smaller than its tokenizer's "
                f"{s_id.length} tokens; the model cannot score every token"
            )


def real_vocab_size(folder: str | Path, rows: int) -> int:
    """The ids an engine on ``folder`` (``rows`` embedding rows) may produce: ``len(tokenizer)`` when the
    folder has a tokenizer and it is smaller than ``rows``, else ``rows``."""
    if not has_tokenizer(folder):
        return rows
    return min(rows, len(load_tokenizer(folder)))


def _ids(value) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, Iterable) and not isinstance(value, str):
        return [int(v) for v in value if isinstance(v, int)]
    return []


def generation_eos_ids(folder: str | Path) -> list[int]:
    """``eos_token_id`` of ``folder/generation_config.json`` (int or list; [] where there is none)."""
    try:
        cfg = json.loads((Path(folder) / "generation_config.json").read_text())
    except (OSError, ValueError):
        return []
    return _ids(cfg.get("eos_token_id"))


def stop_token_ids(
    folder: str | Path | None, tokenizer_eos=None, extra: Iterable[int] = ()
) -> tuple[int, ...]:
    """``extra`` (a request's own stop ids), then every generation-config eos id of ``folder``, then
    ``tokenizer_eos`` (an int or None), each once, in that order."""
    out: list[int] = []
    for i in [*_ids(list(extra)), *(generation_eos_ids(folder) if folder else []), *_ids(tokenizer_eos)]:
        if i not in out:
            out.append(i)
    return tuple(out)
