"""Prompt data: parquet files -> token ids -> a resumable stream of fixed-size batches.

``PromptDataset`` reads the prompt column of every file (paths or globs), renders each prompt with the
student tokenizer's chat template and tokenizes it, once, at construction, so a bad row fails the run
before any training. ``PromptLoader`` cuts the stream ``perm(epoch 0) ++ perm(epoch 1) ++ ...`` into
batches of ``batch_size`` prompts, where ``perm(e)`` is a permutation seeded by ``(seed, e)``. Batch ``b``
is a pure function of ``b`` (``loader.batch(b)``): no prompt is skipped at an epoch's end (a batch may
straddle two epochs), and a checkpoint only needs the index of the next batch to train.

    ds = PromptDataset.from_config(cfg.data, tokenizer)
    loader = PromptLoader.from_config(ds, cfg.data)  # train_batch_size, seed, shuffle
    batch = next(loader)            # PromptBatch(index=0, epoch=0, prompt_ids=[[...], ...], rows=[...])
    state = loader.state_dict()     # {"epoch": 0, "index": 8, "batch": 1, ...}: the next prompt/batch
    loader.load_state_dict(state)   # continue exactly there: no repeat, no gap

With staleness ``k`` the scheduler draws batches before they are trained; checkpoint the first batch
not yet trained with ``loader.state_dict_at(batch_index)``.
"""

from __future__ import annotations

import glob
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "DataError",
    "PromptBatch",
    "PromptDataset",
    "PromptLoader",
    "batch_seed",
    "expand_files",
    "inspect_files",
    "repeat_prompts",
]

_TOKENIZE_CHUNK = 1024  # texts per tokenizer call: fast tokenizers parallelise inside a call


class DataError(ValueError):
    """A problem with the prompt data; the message names the file, the column and, if any, the row."""


def expand_files(patterns: Sequence[str] | str) -> list[str]:
    """Paths and globs -> files in the given order (each glob sorted); duplicates dropped. A pattern that
    matches nothing raises ``FileNotFoundError`` naming it."""
    if isinstance(patterns, str):
        patterns = [patterns]
    out: list[str] = []
    for pat in patterns:
        path = os.path.expanduser(str(pat))
        hits = sorted(glob.glob(path)) if glob.has_magic(path) else ([path] if os.path.isfile(path) else [])
        if not hits and os.path.isdir(path):
            raise FileNotFoundError(
                f"data file {pat} is a folder; name its parquet files, e.g. {pat}/*.parquet"
            )
        if not hits:
            raise FileNotFoundError(
                f"data file {pat} not found" + (" (no file matches)" if glob.has_magic(path) else "")
            )
        out.extend(h for h in hits if h not in out)
    return out


def _parquet_rows(path: str, key: str) -> int:
    """Rows of the parquet file ``path``, which must have the column ``key``; reads the footer only."""
    import pyarrow.parquet as pq  # heavy import; only data users pay for it

    try:
        meta = pq.read_metadata(path)
    except Exception as e:  # pyarrow raises ArrowInvalid/OSError for non-parquet files
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"data file {path}: cannot read as parquet: {reason}") from e
    names = meta.schema.to_arrow_schema().names
    if key not in names:
        raise DataError(
            f"data file {path} has no column '{key}' (data.prompt_key); available columns: {', '.join(names)}"
        )
    return meta.num_rows


def inspect_files(patterns: Sequence[str] | str, key: str) -> list[str]:
    """The files of ``patterns`` (:func:`expand_files`), each readable parquet with the column ``key``, with
    at least one row among them; raises ``FileNotFoundError`` or :class:`DataError` naming the file."""
    files = expand_files(patterns)
    if sum(_parquet_rows(path, key) for path in files) == 0:
        raise DataError(f"data files {', '.join(files)} have no rows")
    return files


def _read_column(path: str, key: str) -> list[Any]:
    import pyarrow.parquet as pq

    _parquet_rows(path, key)
    return pq.read_table(path, columns=[key]).column(key).to_pylist()


def _render(tokenizer, value: Any, where: str) -> tuple[str, bool]:
    """One prompt -> (text, add_special_tokens). Chat templates insert their own special tokens."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if isinstance(value, str):
        if not has_template:
            return value, True
        messages = [{"role": "user", "content": value}]
    elif isinstance(value, list | tuple) and value and all(isinstance(m, dict) for m in value):
        bad = [
            m for m in value if not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str)
        ]
        if bad:
            raise DataError(f"{where}: every chat message needs string 'role' and 'content'; got {bad[0]!r}")
        if not has_template:
            raise DataError(f"{where}: chat-message prompts need a tokenizer with a chat template")
        messages = [{"role": m["role"], "content": m["content"]} for m in value]
    else:
        raise DataError(
            f"{where}: expected a string or a list of {{role, content}} messages, got {value!r:.80}"
        )
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return text, False


class PromptDataset:
    """Tokenized prompts of one or more parquet files, in file order then row order.

    Token ids are held flat (``int32``) with offsets, so a large dataset costs 4 bytes per token.
    ``truncation``: ``error`` (raise, naming file, row and length), ``left`` (keep the last
    ``max_prompt_length`` tokens: the end of a chat template holds the generation prompt) or ``right``.
    """

    def __init__(
        self,
        files: Sequence[str] | str,
        tokenizer,
        *,
        prompt_key: str = "prompt",
        max_prompt_length: int = 512,
        truncation: str = "error",
    ):
        if truncation not in ("error", "left", "right"):
            raise DataError(f"data.truncation={truncation!r}: expected one of error, left, right")
        if max_prompt_length < 1:
            raise DataError(f"data.max_prompt_length={max_prompt_length}: must be >= 1")
        self.files = expand_files(files)
        self.prompt_key = prompt_key
        self.num_truncated = 0
        ids: list[list[int]] = []
        self.sources: list[tuple[str, int]] = []  # (file, first global row) per file
        for path in self.files:
            self.sources.append((path, len(ids)))
            ids.extend(self._tokenize_file(path, tokenizer, max_prompt_length, truncation))
        if not ids:
            raise DataError(
                f"no prompts in column '{prompt_key}' of data files {', '.join(self.files)} (empty dataset)"
            )
        lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
        self._offsets = np.zeros(len(ids) + 1, dtype=np.int64)
        np.cumsum(lengths, out=self._offsets[1:])
        self._tokens = np.fromiter((t for x in ids for t in x), dtype=np.int32, count=int(self._offsets[-1]))

    @classmethod
    def from_config(cls, data_cfg, tokenizer, *, split: str = "train") -> PromptDataset:
        """From ``cfg.data`` (``split``: ``train`` or ``val``)."""
        files = data_cfg.train_files if split == "train" else data_cfg.val_files
        return cls(
            files,
            tokenizer,
            prompt_key=data_cfg.prompt_key,
            max_prompt_length=data_cfg.max_prompt_length,
            truncation=data_cfg.truncation,
        )

    def _tokenize_file(self, path: str, tokenizer, max_len: int, truncation: str) -> list[list[int]]:
        values = _read_column(path, self.prompt_key)
        rendered = [
            _render(tokenizer, v, f"data file {path}, row {i}, column '{self.prompt_key}'")
            for i, v in enumerate(values)
        ]
        out: list[list[int]] = [[] for _ in rendered]
        for special in (True, False):
            rows = [i for i, (_, s) in enumerate(rendered) if s is special]
            for start in range(0, len(rows), _TOKENIZE_CHUNK):
                chunk = rows[start : start + _TOKENIZE_CHUNK]
                enc = tokenizer([rendered[i][0] for i in chunk], add_special_tokens=special)["input_ids"]
                for i, row_ids in zip(chunk, enc, strict=True):
                    out[i] = list(row_ids)
        for i, row_ids in enumerate(out):
            if not row_ids:
                raise DataError(
                    f"data file {path}, row {i}, column '{self.prompt_key}': prompt has no tokens"
                )
            if len(row_ids) > max_len:
                if truncation == "error":
                    raise DataError(
                        f"data file {path}, row {i}: prompt has {len(row_ids)} tokens > "
                        f"data.max_prompt_length={max_len}; set data.truncation=left|right or filter the data"
                    )
                out[i] = row_ids[-max_len:] if truncation == "left" else row_ids[:max_len]
                self.num_truncated += 1
        return out

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def __getitem__(self, i: int) -> list[int]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"prompt {i} out of range for {len(self)} prompts")
        i %= len(self)
        return self._tokens[self._offsets[i] : self._offsets[i + 1]].tolist()

    def where(self, i: int) -> tuple[str, int]:
        """Global row ``i`` -> (file, row within that file)."""
        for path, first in reversed(self.sources):
            if i >= first:
                return path, i - first
        raise IndexError(i)


@dataclass(frozen=True)
class PromptBatch:
    index: int  # global batch index: 0, 1, 2, ... across epochs and resumes
    epoch: int  # epoch of the batch's first prompt
    prompt_ids: list[list[int]]  # batch_size token-id lists
    rows: list[int]  # dataset rows of the prompts (PromptDataset.where(row) -> file, row)


class PromptLoader:
    """Fixed-size prompt batches, shuffled per epoch from ``seed``; an iterator (endless: the trainer
    decides when to stop, see :meth:`num_batches`) with a checkpointable position."""

    def __init__(self, dataset: PromptDataset, batch_size: int, *, seed: int = 0, shuffle: bool = True):
        if batch_size < 1:
            raise DataError(f"data.train_batch_size={batch_size}: must be >= 1")
        self.dataset = dataset
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.next_batch = 0  # the iterator's position, as a global batch index
        self._perms: dict[int, np.ndarray] = {}

    @classmethod
    def from_config(cls, dataset: PromptDataset, data_cfg) -> PromptLoader:
        """From ``cfg.data`` (``train_batch_size``, ``seed``, ``shuffle``)."""
        return cls(dataset, data_cfg.train_batch_size, seed=data_cfg.seed, shuffle=data_cfg.shuffle)

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            n = len(self.dataset)
            perm = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
            if len(self._perms) >= 4:  # batches touch at most two epochs; keep a few for look-ahead
                self._perms.pop(min(self._perms))
            self._perms[epoch] = perm
        return self._perms[epoch]

    def num_batches(self, epochs: int) -> int:
        """Batches that cover ``epochs`` passes over the data (the last one may borrow prompts from the
        next epoch's order, so that every batch has ``batch_size`` prompts)."""
        return math.ceil(epochs * len(self.dataset) / self.batch_size)

    def batch(self, index: int) -> PromptBatch:
        """Batch ``index`` (a pure function of index, seed, batch size and the dataset)."""
        if index < 0:
            raise IndexError(f"batch index {index} must be >= 0")
        n = len(self.dataset)
        start = index * self.batch_size
        rows = []
        for pos in range(start, start + self.batch_size):
            epoch, i = divmod(pos, n)
            rows.append(int(self._perm(epoch)[i]))
        return PromptBatch(
            index=index, epoch=start // n, prompt_ids=[self.dataset[r] for r in rows], rows=rows
        )

    def __iter__(self) -> PromptLoader:
        return self

    def __next__(self) -> PromptBatch:
        b = self.batch(self.next_batch)
        self.next_batch += 1
        return b

    def state_dict_at(self, batch_index: int) -> dict[str, int]:
        """The position just before batch ``batch_index``: what to checkpoint when batches up to
        ``batch_index - 1`` are trained and later ones are still in flight."""
        epoch, index = divmod(batch_index * self.batch_size, len(self.dataset))
        return {
            "epoch": epoch,
            "index": index,  # next prompt within the epoch's order
            "batch": batch_index,
            "batch_size": self.batch_size,
            "seed": self.seed,
            "shuffle": int(self.shuffle),
            "num_prompts": len(self.dataset),
        }

    def state_dict(self) -> dict[str, int]:
        return self.state_dict_at(self.next_batch)

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue at a saved position; the data and batching must be the ones it was saved with."""
        mine = self.state_dict_at(0)
        for key in ("batch_size", "seed", "shuffle", "num_prompts"):
            if key in state and int(state[key]) != mine[key]:
                raise DataError(
                    f"checkpoint data position was saved with {key}={state[key]}, this run has {mine[key]}; "
                    "resuming would repeat or skip prompts (restore the data settings or start a new run)"
                )
        batch = int(state["batch"])
        expect = self.state_dict_at(batch)
        if (int(state["epoch"]), int(state["index"])) != (expect["epoch"], expect["index"]):
            raise DataError(
                f"inconsistent data position {state}: batch {batch} starts at epoch {expect['epoch']}, "
                f"index {expect['index']}"
            )
        self.next_batch = batch


def repeat_prompts(prompts: Sequence[Sequence[int]], n: int) -> list[Sequence[int]]:
    """``rollout.n``: each prompt ``n`` times in a row (``[a, a, b, b]`` for n = 2): the batch the trainer
    sees is prompts x n sequences. With a seeded request, copy j of prompt i is sample ``i * n + j`` and
    gets its own seed (``SamplingConfig.seed + i * n + j``), so the copies differ."""
    if n < 1:
        raise ValueError(f"rollout.n={n}: must be >= 1")
    return [p for p in prompts for _ in range(n)]


def batch_seed(seed: int, batch: int, batch_size: int, n: int = 1) -> int:
    """The sampling seed of training batch ``batch``: its ``batch_size * n`` samples take the seeds
    ``base .. base + batch_size * n - 1``, disjoint from every other batch's."""
    return seed * 1_000_003 + batch * batch_size * n
