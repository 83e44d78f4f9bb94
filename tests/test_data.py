"""Prompt data: parquet -> chat template -> token ids; deterministic per-epoch shuffle; resumable batches."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gkd.data import DataError, PromptDataset, PromptLoader, expand_files, inspect_files
from gkd.demo.tiny import tokenizer as tiny_tokenizer


def _tokenizer(chat_template: bool = True):
    """The tiny byte-level BPE of ``gkd.demo.tiny`` (trained here, nothing downloaded)."""
    hf = tiny_tokenizer()
    if not chat_template:
        hf.chat_template = None
    return hf


@pytest.fixture(scope="module")
def tok():
    return _tokenizer()


@pytest.fixture(scope="module")
def plain_tok():
    return _tokenizer(chat_template=False)


def _write(path, prompts, key="prompt", extra=True):
    cols = {key: prompts}
    if extra:
        cols["answer"] = [str(i) for i in range(len(prompts))]
    pq.write_table(pa.table(cols), path)
    return str(path)


def _strings(tmp_path, n=10, name="p.parquet"):
    return _write(tmp_path / name, [f"fox {i}" for i in range(n)])


def test_string_prompts_use_chat_template_and_plain_tokenizer_uses_text(tmp_path, tok, plain_tok):
    f = _strings(tmp_path, 3)
    ds = PromptDataset(f, tok)
    want = tok("<s>user: fox 1\n<s>assistant:", add_special_tokens=False)["input_ids"]
    assert ds[1] == want and len(ds) == 3
    assert tok.decode(ds[1]) == "<s>user: fox 1\n<s>assistant:"
    plain = PromptDataset(f, plain_tok)
    assert plain_tok.decode(plain[1]) == "fox 1"


def test_chat_message_prompts(tmp_path, tok):
    chats = [
        [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the dog"}],
        [{"role": "user", "content": "the fox"}],
    ]
    ds = PromptDataset(_write(tmp_path / "c.parquet", chats), tok)
    assert tok.decode(ds[0]) == "<s>system: be brief\n<s>user: the dog\n<s>assistant:"
    assert tok.decode(ds[1]) == "<s>user: the fox\n<s>assistant:"


def test_globs_and_file_order(tmp_path, tok):
    _write(tmp_path / "a.parquet", ["fox a0", "fox a1"])
    _write(tmp_path / "b.parquet", ["fox b0"])
    ds = PromptDataset(str(tmp_path / "*.parquet"), tok, prompt_key="prompt")
    assert len(ds) == 3
    assert ds.where(2) == (str(tmp_path / "b.parquet"), 0)
    assert expand_files([str(tmp_path / "b.parquet"), str(tmp_path / "*.parquet")]) == [
        str(tmp_path / "b.parquet"),
        str(tmp_path / "a.parquet"),
    ]


def test_shuffle_is_deterministic_per_seed_and_differs_per_epoch(tmp_path, tok):
    ds = PromptDataset(_strings(tmp_path, 20), tok)
    a = PromptLoader(ds, 5, seed=3)
    b = PromptLoader(ds, 5, seed=3)
    c = PromptLoader(ds, 5, seed=4)
    rows_a = [r for _ in range(8) for r in next(a).rows]  # two epochs
    rows_b = [r for _ in range(8) for r in next(b).rows]
    rows_c = [r for _ in range(8) for r in next(c).rows]
    assert rows_a == rows_b
    assert rows_a != rows_c
    assert sorted(rows_a[:20]) == sorted(rows_a[20:]) == list(range(20))  # each epoch: every row once
    assert rows_a[:20] != rows_a[20:]  # reshuffled
    assert rows_a[:20] != list(range(20))
    from gkd.config import DataConfig

    via_cfg = PromptLoader.from_config(ds, DataConfig(train_batch_size=5, seed=3))
    assert [r for _ in range(8) for r in next(via_cfg).rows] == rows_a
    unshuffled = PromptLoader(ds, 5, seed=3, shuffle=False)
    assert next(unshuffled).rows == [0, 1, 2, 3, 4]


def test_batches_have_stable_indices_and_ids(tmp_path, tok):
    ds = PromptDataset(_strings(tmp_path, 7), tok)
    loader = PromptLoader(ds, 3, seed=0)
    batches = [next(loader) for _ in range(5)]
    assert [b.index for b in batches] == [0, 1, 2, 3, 4]
    assert [b.epoch for b in batches] == [0, 0, 0, 1, 1]  # batch 2 = rows 6, 7 -> straddles epochs 0/1
    assert all(len(b.prompt_ids) == 3 for b in batches)
    assert batches[3].prompt_ids == loader.batch(3).prompt_ids
    assert batches[1].prompt_ids == [ds[r] for r in batches[1].rows]
    assert loader.num_batches(1) == 3 and loader.num_batches(2) == 5


@pytest.mark.parametrize("stop", [1, 2, 3, 5])  # 7 prompts, batches of 3: stops inside and across epochs
def test_resume_continues_without_gap_or_repeat(tmp_path, tok, stop):
    ds = PromptDataset(_strings(tmp_path, 7), tok)
    full = PromptLoader(ds, 3, seed=11)
    reference = [next(full).rows for _ in range(9)]

    first = PromptLoader(ds, 3, seed=11)
    got = [next(first).rows for _ in range(stop)]
    state = first.state_dict()
    assert (state["epoch"], state["index"]) == divmod(stop * 3, 7)

    resumed = PromptLoader(ds, 3, seed=11)  # fresh process: only the state survives
    resumed.load_state_dict(dict(state))
    got += [next(resumed).rows for _ in range(9 - stop)]
    assert got == reference
    stream = [r for rows in got for r in rows]
    for e in range(3):  # 27 prompts = three whole epochs + 6: every epoch holds every row exactly once
        assert sorted(stream[7 * e : 7 * e + 7]) == list(range(7))


def test_state_dict_at_in_flight_batch_and_mismatch_errors(tmp_path, tok):
    ds = PromptDataset(_strings(tmp_path, 7), tok)
    loader = PromptLoader(ds, 3, seed=0)
    for _ in range(4):  # batches 0..3 drawn, only 0..1 trained (staleness 2)
        next(loader)
    state = loader.state_dict_at(2)
    again = PromptLoader(ds, 3, seed=0)
    again.load_state_dict(state)
    assert next(again).index == 2
    with pytest.raises(DataError, match="batch_size=3, this run has 4"):
        PromptLoader(ds, 4, seed=0).load_state_dict(state)
    with pytest.raises(DataError, match="seed=0, this run has 1"):
        PromptLoader(ds, 3, seed=1).load_state_dict(state)


def test_truncation_modes(tmp_path, tok):
    f = _write(tmp_path / "long.parquet", ["fox", "the quick brown fox jumps over the lazy dog " * 4])
    full = PromptDataset(f, tok, max_prompt_length=1000)[1]
    assert len(full) > 12
    with pytest.raises(DataError, match=rf"long\.parquet, row 1: prompt has {len(full)} tokens > "):
        PromptDataset(f, tok, max_prompt_length=12)
    left = PromptDataset(f, tok, max_prompt_length=12, truncation="left")
    right = PromptDataset(f, tok, max_prompt_length=12, truncation="right")
    assert left[1] == full[-12:] and right[1] == full[:12]
    assert left.num_truncated == 1 and left[0] == PromptDataset(f, tok, max_prompt_length=1000)[0]


def test_missing_file_column_and_empty_dataset(tmp_path, tok):
    with pytest.raises(FileNotFoundError, match="nope.parquet not found"):
        PromptDataset(str(tmp_path / "nope.parquet"), tok)
    with pytest.raises(FileNotFoundError, match=r"none\*\.parquet not found \(no file matches\)"):
        PromptDataset(str(tmp_path / "none*.parquet"), tok)
    f = _strings(tmp_path, 3)
    with pytest.raises(
        DataError, match=r"p\.parquet has no column 'question'.*available columns: prompt, answer"
    ):
        PromptDataset(f, tok, prompt_key="question")
    empty = _write(tmp_path / "empty.parquet", pa.array([], pa.string()), extra=False)
    with pytest.raises(DataError, match=r"no prompts in column 'prompt' of data files .*empty\.parquet"):
        PromptDataset(empty, tok)


def test_bad_rows_name_file_and_row(tmp_path, tok, plain_tok):
    f = _write(tmp_path / "bad.parquet", ["fox", None])
    with pytest.raises(DataError, match=r"bad\.parquet, row 1, column 'prompt': expected a string"):
        PromptDataset(f, tok)
    g = _write(tmp_path / "chat.parquet", [[{"role": "user", "content": "fox"}]])
    with pytest.raises(DataError, match="need a tokenizer with a chat template"):
        PromptDataset(g, plain_tok)
    h = tmp_path / "text.parquet"
    h.write_text("not parquet")
    with pytest.raises(DataError, match="cannot read as parquet"):
        PromptDataset(str(h), tok)


def test_inspect_files_reads_footers_only_and_names_the_problem(tmp_path, monkeypatch):
    """The pre-start check: files, column and row count from the parquet footers; no table is read."""
    a, b = _strings(tmp_path, 2, "a.parquet"), _write(tmp_path / "b.parquet", pa.array([], pa.string()))
    monkeypatch.setattr(pq, "read_table", lambda *a, **k: pytest.fail("inspect_files read a table"))
    assert inspect_files(str(tmp_path / "*.parquet"), "prompt") == [a, b]
    with pytest.raises(
        FileNotFoundError, match=r"is a folder; name its files, e\.g\. .*/\*\.parquet"
    ):
        inspect_files(str(tmp_path), "prompt")
    with pytest.raises(DataError, match=r"a\.parquet has no column 'question'"):
        inspect_files(a, "question")
    with pytest.raises(DataError, match=r"data files .*b\.parquet have no rows"):
        inspect_files(b, "prompt")
    (tmp_path / "c.txt").write_text("text")
    with pytest.raises(DataError, match=r"c\.txt: cannot read as parquet"):
        inspect_files(str(tmp_path / "c.txt"), "prompt")
