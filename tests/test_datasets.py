"""Records → SFT examples: reading, shifted answer-only labels, padding, errors that point at the data."""

from __future__ import annotations

import json
import os

import pytest
import torch

from tunesmith.data import DataError, SFTDataset, load_records, load_tokenizer, pad_collate, split_records

from test_tokenizer import CHATML_SPECIALS, SMOLLM_CHATML, build_bpe_dir

DEMO = os.path.join(os.path.dirname(__file__), "..", "data", "demo")


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return load_tokenizer(build_bpe_dir(tmp_path_factory.mktemp("chatml"), CHATML_SPECIALS, "<|im_start|>",
                                        "<|im_end|>", SMOLLM_CHATML))


def _write(path, lines):
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return str(path)


def test_labels_are_shifted_answer_tokens(tok):
    record = {"instruction": "Extract JSON.", "input": "Tom, 27, Oslo.", "output": '{"name": "Tom"}'}
    item = SFTDataset([record], tok, format="instruct", max_seq_len=512)[0]
    messages = [{"role": "user", "content": "Extract JSON.\n\nTom, 27, Oslo."},
                {"role": "assistant", "content": '{"name": "Tom"}'}]
    ids, mask = tok.tokenize_messages(messages)
    assert item["tokens"] == ids
    assert len(item["labels"]) == len(ids) and item["labels"][-1] == -100
    for t in range(len(ids) - 1):  # labels[t] is the target of position t
        assert item["labels"][t] == (ids[t + 1] if mask[t + 1] else -100)
    targets = [x for x in item["labels"] if x != -100]
    assert tok.decode(targets, skip_special_tokens=False) == '{"name": "Tom"}<|im_end|>'


def test_instruct_without_input_and_column_map(tok):
    rec = {"prompt": "Say hi.", "response": "hi"}
    item = SFTDataset([rec], tok, format="instruct", max_seq_len=512,
                      column_map={"instruction": "prompt", "output": "response"})[0]
    assert tok.decode(item["tokens"]).count("Say hi.\n\n") == 0 and "Say hi." in tok.decode(item["tokens"])


def test_chat_format_and_train_on_all(tok):
    rec = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                        {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]}
    item = SFTDataset([rec], tok, format="chat", max_seq_len=512)[0]
    assert tok.decode([x for x in item["labels"] if x != -100], skip_special_tokens=False) == "b<|im_end|>d<|im_end|>"
    full = SFTDataset([rec], tok, format="chat", max_seq_len=512, train_on="all")[0]
    assert full["labels"] == full["tokens"][1:] + [-100]


def test_truncation(tok):
    rec = {"instruction": "x " * 5, "output": "y " * 100}
    ds = SFTDataset([rec], tok, format="instruct", max_seq_len=60)
    assert len(ds[0]["tokens"]) == 60 == len(ds[0]["labels"]) and ds.num_truncated == 1
    assert ds[0]["labels"][-1] == -100 and ds[0]["labels"][-2] != -100
    with pytest.warns(UserWarning, match="dropped 1"), pytest.raises(DataError, match="no usable examples"):
        SFTDataset([rec], tok, format="instruct", max_seq_len=10)  # the answer starts past token 10


def test_demo_data_reads_and_is_disjoint(tok):
    train, val = load_records(os.path.join(DEMO, "train.jsonl")), load_records(os.path.join(DEMO, "val.jsonl"))
    assert len(train) == 600 and len(val) == 60
    for r in train[:50] + val:
        out = json.loads(r["output"])
        assert list(out) == ["name", "age", "city"] and out["name"] in r["input"] and out["city"] in r["input"]
        assert str(out["age"]) in r["input"]
    names = lambda rs: {json.loads(r["output"])["name"] for r in rs}  # noqa: E731
    cities = lambda rs: {json.loads(r["output"])["city"] for r in rs}  # noqa: E731
    assert not names(train) & names(val) and not cities(train) & cities(val)
    assert len(SFTDataset(val, tok, format="instruct", max_seq_len=256)) == 60


def test_json_list_and_hub_layout(tmp_path, monkeypatch):
    recs = [{"instruction": "i", "output": "o"}] * 3
    (tmp_path / "repo" / "data").mkdir(parents=True)
    with open(tmp_path / "repo" / "data" / "train.json", "w") as f:
        json.dump(recs, f)
    _write(tmp_path / "repo" / "data" / "validation.jsonl", [json.dumps(recs[0])])
    assert load_records(str(tmp_path / "repo" / "data" / "train.json")) == recs
    assert load_records(str(tmp_path / "repo"), split="validation") == recs[:1]

    import huggingface_hub

    calls = {}

    def fake_snapshot_download(repo_id, repo_type=None, allow_patterns=None, **kw):
        calls.update(repo_id=repo_id, repo_type=repo_type)
        return str(tmp_path / "repo")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    assert load_records("someone/data") == recs and calls == {"repo_id": "someone/data", "repo_type": "dataset"}
    with pytest.raises(DataError, match="no data files for split 'test'"):
        load_records("someone/data", split="test")


def test_split_records():
    recs = [{"i": i} for i in range(100)]
    train, val = split_records(recs, 0.1, seed=3)
    assert len(val) == 10 and len(train) == 90
    assert sorted(r["i"] for r in train + val) == list(range(100))
    assert split_records(recs, 0.1, seed=3)[1] == val and split_records(recs, 0.1, seed=4)[1] != val


def test_errors_name_file_line_and_field(tmp_path, tok):
    bad_json = _write(tmp_path / "a.jsonl", [json.dumps({"instruction": "i", "output": "o"}), "{not json"])
    with pytest.raises(DataError, match=r"a\.jsonl line 2: not valid JSON"):
        load_records(bad_json)

    missing = _write(tmp_path / "b.jsonl", [json.dumps({"instruction": "i", "output": "o"}), "",
                                            json.dumps({"instruction": "i", "answer": "o"})])
    with pytest.raises(DataError, match=r"b\.jsonl line 3: missing field 'output'.*column_map"):
        SFTDataset(load_records(missing), tok, format="instruct", max_seq_len=64)

    with open(tmp_path / "c.json", "w") as f:
        json.dump([{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
                   {"messages": "hello"}], f)
    with pytest.raises(DataError, match=r"c\.json record 1: field 'messages' must be a non-empty list"):
        SFTDataset(load_records(str(tmp_path / "c.json")), tok, format="chat", max_seq_len=64)

    wrong_type = _write(tmp_path / "d.jsonl", [json.dumps({"instruction": "i", "output": 5})])
    with pytest.raises(DataError, match=r"d\.jsonl line 1: field 'output' must be a string, got int"):
        SFTDataset(load_records(wrong_type), tok, format="instruct", max_seq_len=64)

    bad_msg = _write(tmp_path / "e.jsonl", [json.dumps({"messages": [{"role": "user"}]})])
    with pytest.raises(DataError, match=r"e\.jsonl line 1: messages\[0\]: missing field 'content'"):
        SFTDataset(load_records(bad_msg), tok, format="chat", max_seq_len=64)

    with open(tmp_path / "f.json", "w") as f:
        f.write('[{"instruction": "i",\n "output": }]')
    with pytest.raises(DataError, match=r"f\.json line 2: not valid JSON"):
        load_records(str(tmp_path / "f.json"))
    with pytest.raises(DataError, match="not found"):
        load_records(str(tmp_path / "nope.jsonl"))


def test_pad_collate():
    items = [{"tokens": [5, 6, 7], "labels": [6, 7, -100]}, {"tokens": [8], "labels": [-100]}]
    batch = pad_collate(items, pad_id=0)
    assert torch.equal(batch["tokens"], torch.tensor([[5, 6, 7], [8, 0, 0]]))
    assert torch.equal(batch["labels"], torch.tensor([[6, 7, -100], [-100, -100, -100]]))
    assert batch["tokens"].dtype == torch.long


def test_hub_style_split_names_with_underscores_and_gzipped_jsonl(tmp_path):
    """UltraFeedback names splits train_prefs/test_prefs; Anthropic HH ships train.jsonl.gz."""
    import gzip

    (tmp_path / "uf" / "data").mkdir(parents=True)
    for split, n in (("train_prefs", 3), ("test_prefs", 2)):
        rows = "".join(json.dumps({"i": i, "split": split}) + "\n" for i in range(n))
        (tmp_path / "uf" / "data" / f"{split}-00000-of-00001.jsonl").write_text(rows)
    assert [r["split"] for r in load_records(str(tmp_path / "uf"), split="train_prefs")] == ["train_prefs"] * 3
    assert len(load_records(str(tmp_path / "uf"), split="test_prefs")) == 2
    with pytest.raises(DataError, match="no data files for split 'train'"):
        load_records(str(tmp_path / "uf"), split="train")  # never silently mixes train_prefs and test_prefs

    (tmp_path / "hh" / "helpful-base").mkdir(parents=True)
    with gzip.open(tmp_path / "hh" / "helpful-base" / "train.jsonl.gz", "wt") as f:
        f.write(json.dumps({"chosen": "a", "rejected": "b"}) + "\n" + "{oops\n")
    with pytest.raises(DataError, match=r"train\.jsonl\.gz line 2"):
        load_records(str(tmp_path / "hh"), split="train")


def test_sharegpt_conversations_equal_openai_messages(tok):
    messages = [{"role": "system", "content": "s"}, {"role": "user", "content": "a"},
                {"role": "assistant", "content": "b"}, {"role": "tool", "content": "t"},
                {"role": "assistant", "content": "d"}]
    sharegpt = {"conversations": [{"from": "system", "value": "s"}, {"from": "human", "value": "a"},
                                  {"from": "gpt", "value": "b"}, {"from": "observation", "value": "t"},
                                  {"from": "GPT", "value": "d"}]}
    ours = SFTDataset([{"messages": messages}, sharegpt], tok, format="chat", max_seq_len=512).items
    assert ours[0] == ours[1]
    mapped = SFTDataset([{"dialog": sharegpt["conversations"]}], tok, format="chat", max_seq_len=512,
                        column_map={"messages": "dialog"}).items
    assert mapped[0] == ours[0]


def test_text_format_labels_every_token_and_splits_long_texts(tok):
    text = " ".join(["red green blue cat"] * 30)
    ids = tok.encode(text, add_special_tokens=True) + [tok.eos_id]
    with pytest.warns(UserWarning, match="dropped 1 example"):
        ds = SFTDataset([{"text": text}, {"text": "  "}], tok, format="text", max_seq_len=32)
    assert ds.num_truncated == 1 and all(len(item["tokens"]) <= 32 for item in ds)
    targets = [y for item in ds for y in item["labels"] if y != -100]
    assert targets == ids[1:]  # every token but the first is predicted exactly once, EOS included
    for item in ds:
        assert item["labels"] == item["tokens"][1:] + [-100]
    assert ds.prompt_messages(0) == []  # plain text has no prompt to sample an answer for


def test_column_map_to_a_field_no_record_has_names_file_and_field(tmp_path, tok):
    path = _write(tmp_path / "a.jsonl", [json.dumps({"instruction": "i", "output": "o"})] * 2)
    with pytest.raises(DataError, match=r"a\.jsonl: data.column_map.input='context', but no record has a field 'context'"):
        SFTDataset(load_records(path), tok, format="instruct", max_seq_len=64, column_map={"input": "context"},
                   source_name=path)


def test_data_that_fits_another_format_says_which(tmp_path, tok):
    path = _write(tmp_path / "chat.jsonl", [json.dumps({"messages": [{"role": "user", "content": "a"}]})])
    with pytest.raises(DataError, match=r"chat\.jsonl line 1: missing field 'instruction'.*set data.format=chat"):
        SFTDataset(load_records(path), tok, format="instruct", max_seq_len=64)
    path = _write(tmp_path / "text.jsonl", [json.dumps({"text": "hello"})])
    with pytest.raises(DataError, match=r"missing field 'messages'.*set data.format=text"):
        SFTDataset(load_records(path), tok, format="chat", max_seq_len=64)
