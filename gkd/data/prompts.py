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

import math
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from gkd.data.sources import (
    DataError,
    Source,
    expand_files,
    file_rows,
    inspect_source,
    read_source,
    sources_from_config,
)

__all__ = [
    "DataError",
    "PromptBatch",
    "PromptDataset",
    "PromptLoader",
    "Source",
    "batch_seed",
    "expand_files",
    "inspect_files",
    "inspect_source",
    "inspect_sources",
    "sources_from_config",
    "repeat_prompts",
]

_TOKENIZE_CHUNK = 1024  # texts per tokenizer call: fast tokenizers parallelise inside a call
_MIX_TAG = 0x6D6978  # seeds the mixture's source draws apart from the shuffles


def inspect_sources(sources: Sequence[Source]) -> None:
    """Every source exists, has its prompt column and rows, read from headers only
    (:func:`gkd.data.sources.inspect_source`); raises ``FileNotFoundError`` or :class:`DataError`."""
    for source in sources:
        inspect_source(source)


def inspect_files(patterns: Sequence[str] | str, key: str) -> list[str]:
    """The paths of ``patterns`` (files and globs expanded; saved datasets and hub ids as given), each
    with the column ``key`` and at least one row among them (headers only); raises ``FileNotFoundError``
    or :class:`DataError` naming the file."""
    if isinstance(patterns, str):
        patterns = [patterns]
    sources = [Source(str(p), key) for p in patterns]
    out, rows = [], 0
    for source in sources:
        if source.kind == "files":
            files = expand_files(source.path)
            rows += sum(file_rows(f, key) for f in files)
            out.extend(f for f in files if f not in out)
        else:
            rows += abs(inspect_source(source))  # hub datasets: -1, read later
            out.append(source.path)
    if rows == 0:
        raise DataError(f"data files {', '.join(out)} have no rows")
    return out


def _render(tokenizer, value: Any, where: str, template: Mapping[str, Any] | None = None) -> tuple[str, bool]:
    """One prompt -> (text, add_special_tokens). Chat templates insert their own special tokens.
    ``template``: ``system_prompt`` (a system message first, unless the chat has one) and ``kwargs``
    (``data.chat_template_kwargs``, passed to ``apply_chat_template``)."""
    template = template or {}
    system = template.get("system_prompt")
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if isinstance(value, str):
        if not has_template and system is None:
            return value, True
        messages = [{"role": "user", "content": value}]
    elif isinstance(value, list | tuple) and value and all(isinstance(m, dict) for m in value):
        bad = [
            m for m in value if not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str)
        ]
        if bad:
            raise DataError(f"{where}: every chat message needs string 'role' and 'content'; got {bad[0]!r}")
        messages = [{"role": m["role"], "content": m["content"]} for m in value]
    else:
        raise DataError(
            f"{where}: expected a string or a list of {{role, content}} messages, got {value!r:.80}"
        )
    if not has_template:
        what = "chat-message prompts" if system is None else "data.system_prompt"
        raise DataError(f"{where}: {what} need a tokenizer with a chat template")
    if system is not None and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system}, *messages]
    kwargs = dict(template.get("kwargs") or {})
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **kwargs)
    return text, False


class PromptDataset:
    """Tokenized prompts of one or more sources, in source order then row order.

    ``files``: paths, globs, saved-dataset folders or hub dataset ids (each with ``prompt_key``), or
    :class:`Source` objects. Sources with a ``weight`` form a mixture (:class:`PromptLoader` draws from
    them by weight; ``groups`` holds each one's rows). Token ids are held flat (``int32``) with offsets,
    so a large dataset costs 4 bytes per token. ``truncation``: ``error`` (raise, naming file, row and
    length), ``left`` (keep the last ``max_prompt_length`` tokens: the end of a chat template holds the
    generation prompt) or ``right``. ``chat_template_kwargs`` go to ``apply_chat_template`` (e.g.
    ``{"enable_thinking": False}``); ``system_prompt`` becomes the first message of every chat that has
    no system message of its own.
    """

    def __init__(
        self,
        files: Sequence[str | Source] | str,
        tokenizer,
        *,
        prompt_key: str = "prompt",
        max_prompt_length: int = 512,
        truncation: str = "error",
        chat_template_kwargs: Mapping[str, Any] | None = None,
        system_prompt: str | None = None,
    ):
        if truncation not in ("error", "left", "right"):
            raise DataError(f"data.truncation={truncation!r}: expected one of error, left, right")
        if max_prompt_length < 1:
            raise DataError(f"data.max_prompt_length={max_prompt_length}: must be >= 1")
        if isinstance(files, str):
            files = [files]
        sources = [f if isinstance(f, Source) else Source(str(f), prompt_key) for f in files]
        self.inputs = sources  # what was read, in order (other columns of the same rows: gkd.trainer.sources)
        self.prompt_key = prompt_key
        self.num_truncated = 0
        self._template = {"system_prompt": system_prompt, "kwargs": dict(chat_template_kwargs or {})}
        ids: list[list[int]] = []
        self.sources: list[tuple[str, int]] = []  # (file or dataset, first global row) per file
        self.groups: list[tuple[int, int]] = []  # (first global row, rows) per source
        for source in sources:
            first = len(ids)
            for where, values in read_source(source):
                self.sources.append((where.split(" ", 2)[-1], len(ids)))
                ids.extend(
                    self._tokenize(where, source.prompt_key, values, tokenizer, max_prompt_length, truncation)
                )
            if source.weight is not None and len(ids) == first:
                raise DataError(f"data source {source.path}: no prompts in column '{source.prompt_key}'")
            self.groups.append((first, len(ids) - first))
        self.files = [path for path, _ in self.sources]
        weighted = [s.weight is not None for s in sources]
        if any(weighted) and not all(weighted):
            raise DataError("data sources: give every source a weight, or none")
        self.weights = [float(s.weight) for s in sources] if all(weighted) and len(sources) > 1 else None
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
        """From ``cfg.data`` (``split``: ``train`` or ``val``; ``data.sources`` mix the training prompts)."""
        return cls(
            sources_from_config(data_cfg, split),
            tokenizer,
            prompt_key=data_cfg.prompt_key,
            max_prompt_length=data_cfg.max_prompt_length,
            truncation=data_cfg.truncation,
            chat_template_kwargs=getattr(data_cfg, "chat_template_kwargs", None),
            system_prompt=getattr(data_cfg, "system_prompt", None),
        )

    def _tokenize(
        self, where: str, key: str, values, tokenizer, max_len: int, truncation: str
    ) -> list[list[int]]:
        rendered = [
            _render(tokenizer, v, f"{where}, row {i}, column '{key}'", self._template)
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
                raise DataError(f"{where}, row {i}, column '{key}': prompt has no tokens")
            if len(row_ids) > max_len:
                if truncation == "error":
                    raise DataError(
                        f"{where}, row {i}: prompt has {len(row_ids)} tokens > "
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
    decides when to stop, see :meth:`num_batches`) with a checkpointable position.

    A dataset with weighted sources (``dataset.weights``) is a mixture: each prompt of batch ``b`` comes
    from a source drawn with probability weight / total (the draws of batch ``b`` seeded by ``(seed, b)``),
    and a source's k-th prompt is entry k of its own stream of per-epoch permutations, so a small source
    repeats sooner than a large one. Batch ``b`` is still a pure function of ``b``: resuming is exact."""

    def __init__(self, dataset: PromptDataset, batch_size: int, *, seed: int = 0, shuffle: bool = True):
        if batch_size < 1:
            raise DataError(f"data.train_batch_size={batch_size}: must be >= 1")
        self.dataset = dataset
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.next_batch = 0  # the iterator's position, as a global batch index
        self._perms: dict[tuple[int, int], np.ndarray] = {}
        weights = getattr(dataset, "weights", None)  # any sequence of prompts is one unweighted source
        self._p = None if weights is None else np.asarray(weights, dtype=np.float64) / float(sum(weights))
        # mixture: picks of each source before batch b, for b = 0 .. len - 1 (grown as batches are asked)
        self._sources = len(getattr(dataset, "groups", ()))
        self._counts = [np.zeros(self._sources, dtype=np.int64)]

    @classmethod
    def from_config(cls, dataset: PromptDataset, data_cfg) -> PromptLoader:
        """From ``cfg.data`` (``train_batch_size``, ``seed``, ``shuffle``)."""
        return cls(dataset, data_cfg.train_batch_size, seed=data_cfg.seed, shuffle=data_cfg.shuffle)

    def _perm(self, epoch: int, source: int = -1) -> np.ndarray:
        """The order of epoch ``epoch`` of the whole dataset (``source`` -1) or of one mixture source."""
        key = (source, epoch)
        if key not in self._perms:
            if source < 0:
                n, seed = len(self.dataset), [self.seed, epoch]
            else:
                n, seed = self.dataset.groups[source][1], [self.seed, _MIX_TAG, source, epoch]
            perm = np.random.default_rng(seed).permutation(n) if self.shuffle else np.arange(n)
            # batches touch at most two epochs of each source; keep a few for look-ahead
            if len(self._perms) >= 4 * self._sources + 4:
                self._perms.pop(next(iter(self._perms)))
            self._perms[key] = perm
        return self._perms[key]

    def _draws(self, index: int) -> np.ndarray:
        """Mixture: the source of each prompt of batch ``index`` [batch_size]."""
        rng = np.random.default_rng([self.seed, _MIX_TAG, index])
        return rng.choice(len(self._p), size=self.batch_size, p=self._p)

    def _mixed_rows(self, index: int) -> list[int]:
        while len(self._counts) <= index:
            b = len(self._counts) - 1
            self._counts.append(self._counts[b] + np.bincount(self._draws(b), minlength=len(self._p)))
        seen = self._counts[index].copy()
        rows = []
        for s in self._draws(index).tolist():
            first, n = self.dataset.groups[s]
            epoch, i = divmod(int(seen[s]), n)
            rows.append(first + int(self._perm(epoch, s)[i]))
            seen[s] += 1
        return rows

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
        if self._p is not None:
            rows = self._mixed_rows(index)
        else:
            rows = [int(self._perm(pos // n)[pos % n]) for pos in range(start, start + self.batch_size)]
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
            "mixture": self._mixture_id(),
        }

    def _mixture_id(self) -> int:
        """0 without weighted sources, else a CRC-32 of the weights and the sources' sizes."""
        if self._p is None:
            return 0
        desc = repr((list(self.dataset.weights), [n for _, n in self.dataset.groups]))
        return zlib.crc32(desc.encode()) or 1

    def state_dict(self) -> dict[str, int]:
        return self.state_dict_at(self.next_batch)

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue at a saved position; the data and batching must be the ones it was saved with."""
        mine = self.state_dict_at(0)
        for key in ("batch_size", "seed", "shuffle", "num_prompts", "mixture"):
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
