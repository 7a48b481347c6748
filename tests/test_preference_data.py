"""Preference records → tokenized pairs: the three layouts, response-only labels, Hub folders, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tunesmith.data import DataError, load_records, load_tokenizer
from tunesmith.data.collate import IGNORE_INDEX
from tunesmith.data.preference import PreferenceDataset, preference_collate, record_to_pair

PROMPT = "Reverse the words.\n\nred cat"
CHOSEN, REJECTED = "cat red", "red cat red cat"


@pytest.fixture(scope="module")
def tok(tiny_llama_dir):
    return load_tokenizer(str(tiny_llama_dir))


def labelled_text(tok, tokens, labels) -> str:
    """Decode the tokens the labels score (labels are shifted: label t is token t + 1)."""
    return tok.decode([y for y in labels if y != IGNORE_INDEX], skip_special_tokens=False)


def test_plain_strings_score_only_the_answer(tok):
    item = PreferenceDataset([{"prompt": PROMPT, "chosen": CHOSEN, "rejected": REJECTED}], tok)[0]
    for side, answer in (("chosen", CHOSEN), ("rejected", REJECTED)):
        tokens, labels = item[f"{side}_tokens"], item[f"{side}_labels"]
        full = tok.render_chat([{"role": "user", "content": PROMPT}, {"role": "assistant", "content": answer}])
        assert tokens == tok.encode(full, add_special_tokens=False)  # the chat template, exactly
        assert labelled_text(tok, tokens, labels) == answer + "<|im_end|>"  # answer + end of turn only
        assert labels == [y if y == IGNORE_INDEX else tokens[t + 1] for t, y in enumerate(labels)]  # shifted


def test_ultrafeedback_layout_equals_plain_layout(tok):
    plain = {"prompt": PROMPT, "chosen": CHOSEN, "rejected": REJECTED}
    uf = {"prompt": PROMPT,
          "chosen": [{"role": "user", "content": PROMPT}, {"role": "assistant", "content": CHOSEN}],
          "rejected": [{"role": "user", "content": PROMPT}, {"role": "assistant", "content": REJECTED}],
          "score_chosen": 8.0, "score_rejected": 3.0}
    bare = {"prompt": [{"role": "user", "content": PROMPT}], "chosen": [{"role": "assistant", "content": CHOSEN}],
            "rejected": [{"role": "assistant", "content": REJECTED}]}
    items = PreferenceDataset([plain, uf, bare], tok).items
    for other in items[1:]:
        assert {k: v for k, v in other.items() if k != "index"} == {k: v for k, v in items[0].items() if k != "index"}


def test_anthropic_hh_transcripts_share_the_prompt_and_score_the_last_answer(tok):
    shared = "\n\nHuman: red cat\n\nAssistant: one two\n\nHuman: Reverse the words."
    record = {"chosen": shared + "\n\nAssistant: cat red", "rejected": shared + "\n\nAssistant: no"}
    prompt, chosen, rejected = record_to_pair(record, "hh.jsonl line 1")
    assert prompt == [{"role": "user", "content": "red cat"}, {"role": "assistant", "content": "one two"},
                      {"role": "user", "content": "Reverse the words."}]
    assert (chosen, rejected) == ("cat red", "no")
    item = PreferenceDataset([record], tok)[0]
    # The earlier assistant turn is prompt: only the final answer is scored.
    assert labelled_text(tok, item["chosen_tokens"], item["chosen_labels"]) == "cat red<|im_end|>"
    assert labelled_text(tok, item["rejected_tokens"], item["rejected_labels"]) == "no<|im_end|>"
    with pytest.raises(DataError, match=r"hh.jsonl line 1: 'chosen' and 'rejected' transcripts differ"):
        record_to_pair({"chosen": record["chosen"], "rejected": "\n\nHuman: hi\n\nAssistant: no"}, "hh.jsonl line 1")


def test_collate_puts_chosen_rows_then_rejected_rows(tok):
    ds = PreferenceDataset([{"prompt": f"p{i}", "chosen": "a " * (i + 1), "rejected": "b"} for i in range(3)], tok)
    batch = preference_collate([ds[2], ds[0]], tok.pad_id)
    assert batch["tokens"].shape[0] == 4 and batch["index"].tolist() == [2, 0]
    for row, (i, side) in enumerate([(2, "chosen"), (0, "chosen"), (2, "rejected"), (0, "rejected")]):
        n = len(ds[i][f"{side}_tokens"])
        assert batch["tokens"][row, :n].tolist() == ds[i][f"{side}_tokens"]
        assert batch["labels"][row, :n].tolist() == ds[i][f"{side}_labels"]
        assert (batch["labels"][row, n:] == IGNORE_INDEX).all() and batch["lengths"][row] == n


def test_hub_dataset_repo_layout(tok, tmp_path, monkeypatch):
    """A Hub id is fetched with snapshot_download; a local folder laid out like the repo stands in for it."""
    import huggingface_hub

    repo = tmp_path / "hub"
    (repo / "data").mkdir(parents=True)
    for split, n in (("train", 5), ("test", 2)):
        rows = [{"prompt": f"q{i}", "chosen": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "yes"}],
                 "rejected": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "no"}]} for i in range(n)]
        (repo / "data" / f"{split}-00000-of-00001.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    calls = []

    def fake_download(repo_id, repo_type, allow_patterns):
        calls.append((repo_id, repo_type))
        return str(repo)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    train = PreferenceDataset(load_records("someone/prefs", split="train"), tok)
    test = PreferenceDataset(load_records("someone/prefs", split="test"), tok)
    assert (len(train), len(test)) == (5, 2) and calls[0] == ("someone/prefs", "dataset")
    assert labelled_text(tok, train[3]["rejected_tokens"], train[3]["rejected_labels"]) == "no<|im_end|>"


@pytest.mark.parametrize("line,message", [
    ({"prompt": "q", "chosen": "a"}, r"prefs.jsonl line 2: missing field 'rejected'"),
    ({"chosen": "a", "rejected": "b"}, r"prefs.jsonl line 2: field 'chosen' is not a .*transcript"),
    ({"chosen": [{"role": "assistant", "content": "a"}], "rejected": "b"}, r"prefs.jsonl line 2: missing field 'prompt'"),
    ({"prompt": "q", "chosen": [{"role": "user", "content": "q"}], "rejected": "b"},
     r"prefs.jsonl line 2: field 'chosen' must end with an assistant message"),
    ({"prompt": "q", "chosen": "a", "rejected": [{"role": "bot", "content": "b"}]},
     r"prefs.jsonl line 2: rejected\[0\] has role 'bot'"),
    ({"prompt": 3, "chosen": "a", "rejected": "b"}, r"prefs.jsonl line 2: field 'prompt' must be a string or"),
])
def test_bad_records_name_file_line_and_field(tok, tmp_path, line, message):
    path = tmp_path / "prefs.jsonl"
    path.write_text(json.dumps({"prompt": "q", "chosen": "a", "rejected": "b"}) + "\n" + json.dumps(line) + "\n")
    with pytest.raises(DataError, match=message.replace("prefs.jsonl", str(path).replace("\\", "/"))):
        PreferenceDataset(load_records(str(path)), tok)


def test_pairs_whose_answer_is_cut_off_are_dropped(tok):
    long_prompt = " ".join(["red cat"] * 40)
    with pytest.warns(UserWarning, match="dropped 1 pair"):
        ds = PreferenceDataset([{"prompt": long_prompt, "chosen": "a", "rejected": "b"},
                                {"prompt": "q", "chosen": "a", "rejected": "b"}], tok, max_seq_len=24)
    assert len(ds) == 1 and ds[0]["index"] == 0 and ds.prompt_messages(0)[0]["content"] == "q"
    assert all(len(ds[0][k]) <= 24 for k in ("chosen_tokens", "rejected_tokens"))


def test_shipped_demo_reads_and_val_questions_are_unseen(tok):
    demo = Path(__file__).resolve().parent.parent / "data" / "demo"
    train, val = load_records(str(demo / "preference_train.jsonl")), load_records(str(demo / "preference_val.jsonl"))
    assert len(train) >= 100 and len(val) >= 20
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in val}
    assert all(r["chosen"] in r["rejected"] and len(r["rejected"]) > 3 * len(r["chosen"]) for r in train + val)
    assert len(PreferenceDataset(val, tok, max_seq_len=256)) == len(val)


def test_labels_never_fall_on_an_earlier_turn_when_the_prompt_is_cut(tok):
    """The old failure: max_seq_len cut into a multi-turn prompt, the "last run" of the mask became an
    earlier assistant turn, and chosen/rejected got identical labels that train nothing."""
    earlier = " ".join(["one two three"] * 8)
    record = {"chosen": f"\n\nHuman: red cat\n\nAssistant: {earlier}\n\nHuman: Reverse the words.\n\nAssistant: cat red",
              "rejected": f"\n\nHuman: red cat\n\nAssistant: {earlier}\n\nHuman: Reverse the words.\n\nAssistant: no"}
    full = PreferenceDataset([record], tok, max_seq_len=512)[0]
    final_start = len(full["chosen_tokens"]) - len(tok.encode("cat red<|im_end|>\n", add_special_tokens=False))
    with pytest.warns(UserWarning, match=r"dropped 1 pair\(s\) of 2: 1 whose final answer starts beyond"):
        ds = PreferenceDataset([record, {"prompt": "q", "chosen": "a", "rejected": "b"}], tok, max_seq_len=final_start - 2)
    assert len(ds) == 1 and ds.num_dropped == 1 and ds.prompt_messages(0)[0]["content"] == "q"


def test_an_answer_cut_at_max_seq_len_keeps_only_its_own_tokens(tok):
    record = {"prompt": PROMPT, "chosen": "red green blue cat dog fish", "rejected": "one two three four five six"}
    full = PreferenceDataset([record], tok, max_seq_len=512)[0]
    answer_start = next(t for t, y in enumerate(full["chosen_labels"]) if y != IGNORE_INDEX)
    n = answer_start + 4
    with pytest.warns(UserWarning, match=r"1 pair\(s\) have an answer cut"):
        ds = PreferenceDataset([record], tok, max_seq_len=n)
    item = ds[0]
    assert item["chosen_tokens"] == full["chosen_tokens"][:n] and ds.num_truncated == 1
    assert item["chosen_labels"] == full["chosen_labels"][:n - 1] + [IGNORE_INDEX]  # the cut target is not kept


def test_pairs_identical_within_max_seq_len_are_dropped(tok):
    record = {"prompt": PROMPT, "chosen": "red green blue cat dog", "rejected": "red green blue cat fish"}
    full = PreferenceDataset([record], tok, max_seq_len=512)[0]
    answer_start = next(t for t, y in enumerate(full["chosen_labels"]) if y != IGNORE_INDEX)
    same = {"prompt": PROMPT, "chosen": "same", "rejected": "same"}
    with pytest.warns(UserWarning, match="2 whose chosen and rejected are identical"), \
            pytest.raises(DataError, match="no usable preference pairs"):
        PreferenceDataset([record, same], tok, max_seq_len=answer_start + 3)


def test_chat_layout_pairs_must_answer_the_same_conversation(tok):
    conv = lambda q, a: [{"role": "user", "content": q}, {"role": "assistant", "content": a}]  # noqa: E731
    with pytest.raises(DataError, match=r"uf.jsonl line 7: 'chosen' and 'rejected' answer different conversations"):
        record_to_pair({"prompt": "q", "chosen": conv("q", "a"), "rejected": conv("another q", "b")}, "uf.jsonl line 7")
    # the conversation in chosen/rejected wins over the prompt field, as UltraFeedback repeats it there
    prompt, chosen, rejected = record_to_pair({"prompt": "q ", "chosen": conv("q", "a"), "rejected": conv("q", "b")}, "x")
    assert prompt == [{"role": "user", "content": "q"}] and (chosen, rejected) == ("a", "b")
