"""Prompt data: parquet -> chat template -> token ids; deterministic per-epoch shuffle; resumable batches."""

from __future__ import annotations

import copy
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gkd.data.prompts import DataError, PromptDataset, PromptLoader, Source, expand_files, inspect_files
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
    with pytest.raises(FileNotFoundError, match=r"is a folder; name its files, e\.g\. .*/\*\.parquet"):
        inspect_files(str(tmp_path), "prompt")
    with pytest.raises(DataError, match=r"a\.parquet has no column 'question'"):
        inspect_files(a, "question")
    with pytest.raises(DataError, match=r"data files .*b\.parquet have no rows"):
        inspect_files(b, "prompt")
    (tmp_path / "c.txt").write_text("text")
    with pytest.raises(DataError, match=r"c\.txt: cannot read as parquet"):
        inspect_files(str(tmp_path / "c.txt"), "prompt")


# ------------------------------------------------------------------- formats, templates, mixtures


def _jsonl(path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def test_jsonl_json_and_saved_datasets_read_like_parquet(tmp_path, tok):
    chat = [{"role": "user", "content": "the dog"}]
    j = _jsonl(tmp_path / "a.jsonl", [{"prompt": "fox 0", "x": 1}, {"prompt": chat}])
    arr = tmp_path / "b.json"
    arr.write_text(json.dumps([{"question": "fox 1"}, {"question": "fox 2"}]))
    datasets = pytest.importorskip("datasets")
    saved = tmp_path / "saved"
    datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"prompt": ["fox 3"]}),
            "test": datasets.Dataset.from_dict({"prompt": ["x"]}),
        }
    ).save_to_disk(str(saved))
    ds = PromptDataset([j, Source(str(arr), "question"), str(saved), _strings(tmp_path, 1)], tok)
    assert [tok.decode(ds[i]) for i in range(len(ds))] == [
        "<s>user: fox 0\n<s>assistant:", "<s>user: the dog\n<s>assistant:", "<s>user: fox 1\n<s>assistant:",
        "<s>user: fox 2\n<s>assistant:", "<s>user: fox 3\n<s>assistant:", "<s>user: fox 0\n<s>assistant:",
    ]  # fmt: skip
    assert ds.where(3) == (str(arr), 1) and ds.where(4) == (str(saved), 0)
    with pytest.raises(DataError, match=r"a\.jsonl, record 1: no field 'question'"):
        PromptDataset([Source(j, "question")], tok)
    with pytest.raises(DataError, match=r"saved has no split 'validation'; splits: train, test"):
        PromptDataset([Source(str(saved), split="validation")], tok)


def test_system_prompt_and_chat_template_kwargs(tmp_path, tok):
    template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}" + (
        "{% if add_generation_prompt %}assistant:{% if enable_thinking is defined and not enable_thinking %}"
        " <no-think>{% endif %}{% endif %}"
    )
    t = copy.deepcopy(tok)
    t.chat_template = template
    own = [{"role": "system", "content": "own"}, {"role": "user", "content": "dog"}]
    f = _jsonl(tmp_path / "p.jsonl", [{"prompt": "fox"}, {"prompt": own}])
    ds = PromptDataset(f, t, system_prompt="Be brief.", chat_template_kwargs={"enable_thinking": False})
    assert t.decode(ds[0]) == "system: Be brief.\nuser: fox\nassistant: <no-think>"
    assert t.decode(ds[1]) == "system: own\nuser: dog\nassistant: <no-think>"  # its own system message kept
    assert t.decode(PromptDataset(f, t)[0]) == "user: fox\nassistant:"
    from gkd.config import load_config

    cfg = load_config([], ["model.student_path=x", f"data.train_files={f}", "data.system_prompt=Be brief.",
                           "data.chat_template_kwargs={enable_thinking: false}"])  # fmt: skip
    assert PromptDataset.from_config(cfg.data, t)[0] == ds[0]
    plain = copy.deepcopy(tok)
    plain.chat_template = None
    with pytest.raises(DataError, match="data.system_prompt need a tokenizer with a chat template"):
        PromptDataset(f, plain, system_prompt="x")


def _mixture(tmp_path, tok, weights=(3.0, 1.0)):
    a = _write(tmp_path / "a.parquet", [f"fox a{i}" for i in range(4)])
    b = _jsonl(tmp_path / "b.jsonl", [{"q": f"fox b{i}"} for i in range(30)])
    return PromptDataset([Source(a, weight=weights[0]), Source(b, "q", weight=weights[1])], tok)


def test_weighted_sources_mix_by_weight_and_each_cycles_its_own_epochs(tmp_path, tok):
    ds = _mixture(tmp_path, tok)
    assert ds.groups == [(0, 4), (4, 30)] and ds.weights == [3.0, 1.0]
    loader = PromptLoader(ds, 8, seed=5)
    rows = [r for _ in range(100) for r in next(loader).rows]
    share = sum(r < 4 for r in rows) / len(rows)
    assert 0.7 < share < 0.8  # 3 : 1, although source a is 7.5x smaller
    a_stream = [r for r in rows if r < 4]
    for e in range(len(a_stream) // 4):  # the small source: every epoch holds each of its rows once
        assert sorted(a_stream[4 * e : 4 * e + 4]) == [0, 1, 2, 3]
    assert a_stream[:4] != a_stream[4:8] or a_stream[4:8] != a_stream[8:12]  # reshuffled per epoch
    again = PromptLoader(_mixture(tmp_path, tok), 8, seed=5)
    assert [r for _ in range(100) for r in next(again).rows] == rows  # deterministic
    other = PromptLoader(ds, 8, seed=6)
    assert [r for _ in range(10) for r in next(other).rows] != rows[:80]


@pytest.mark.parametrize("stop", [1, 7, 13])
def test_a_mixture_resumes_exactly(tmp_path, tok, stop):
    ds = _mixture(tmp_path, tok)
    reference = [PromptLoader(ds, 6, seed=2).batch(b).rows for b in range(20)]
    first = PromptLoader(ds, 6, seed=2)
    got = [next(first).rows for _ in range(stop)]
    resumed = PromptLoader(_mixture(tmp_path, tok), 6, seed=2)  # a fresh process: only the state survives
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    got += [next(resumed).rows for _ in range(20 - stop)]
    assert got == reference
    with pytest.raises(DataError, match="mixture="):  # other weights: resuming would not continue the stream
        PromptLoader(_mixture(tmp_path, tok, (1.0, 1.0)), 6, seed=2).load_state_dict(first.state_dict())


def test_sources_from_config_and_comma_lists(tmp_path, tok):
    from gkd.config import load_config

    ds = _mixture(tmp_path, tok)
    a, b = str(tmp_path / "a.parquet"), str(tmp_path / "b.jsonl")
    cfg = load_config([], ["model.student_path=x", f"data.sources=[{{path: '{a}', weight: 3}}, "
                                                   f"{{path: '{b}', prompt_key: q}}]"])  # fmt: skip
    via_cfg = PromptDataset.from_config(cfg.data, tok)
    assert via_cfg.groups == ds.groups and via_cfg.weights == [3.0, 1.0]
    assert [via_cfg[i] for i in range(len(ds))] == [ds[i] for i in range(len(ds))]
    c = _write(tmp_path / "c.parquet", ["fox c"])
    cfg = load_config([], ["model.student_path=x", f"data.train_files={a},{c}"])
    assert cfg.data.train_files == [a, c]
    assert len(PromptDataset.from_config(cfg.data, tok)) == 5


def test_preflight_reads_headers_of_jsonl_and_names_the_source(tmp_path, monkeypatch):
    from gkd.config import load_config
    from gkd.services.inputs import InputError, check_run

    good = _jsonl(tmp_path / "good.jsonl", [{"prompt": "fox"}])
    bad = _jsonl(tmp_path / "bad.jsonl", [{"question": "fox"}])
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    assert inspect_files([good], "prompt") == [good]
    with pytest.raises(DataError, match=r"bad\.jsonl has no column 'prompt' .*available columns: question"):
        inspect_files([bad], "prompt")
    with pytest.raises(DataError, match=r"empty\.jsonl have no rows"):
        inspect_files([str(empty)], "prompt")
    # only the first line is read: a broken later line is the trainer's to report
    (tmp_path / "late.jsonl").write_text('{"prompt": "fox"}\nnot json\n')
    assert inspect_files([str(tmp_path / "late.jsonl")], "prompt")

    def run(*overrides):
        cfg = load_config([], ["model.student_path=x", f"trainer.output_dir={tmp_path}/out", *overrides])
        monkeypatch.setattr("gkd.services.inputs.model_folder", lambda *a, **k: None)
        check_run(cfg)

    run(f"data.sources=[{{path: '{good}'}}, {{path: '{bad}', prompt_key: question}}]")
    with pytest.raises(
        InputError, match=r"^data.sources\[1\]: data file .*bad\.jsonl has no column 'prompt'"
    ):
        run(f"data.sources=[{{path: '{good}'}}, {{path: '{bad}'}}]")
    with pytest.raises(InputError, match=r"^data.sources\[0\]: data source .*empty\.jsonl has no rows"):
        run(f"data.sources=[{{path: '{empty}'}}]")
