"""PromptDataModule: every file format, extra columns, clear errors, padding, truncation, splits, resumable shuffle."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import datasets
import lightning as L
import pytest
import torch
from conftest import char_ids

from rlhf_lightning.data import PromptDataModule
from rlhf_lightning.data.prompts import ResumableSampler
from rlhf_lightning.infra.errors import ConfigError

ROWS = [
    {"prompt": "1+2=", "answer": "3", "id": 0},
    {"prompt": "10+20=", "answer": "30", "id": 1},
    {"prompt": "4+4=", "answer": "8", "id": 2},
]


def write(path: Path, rows: list[dict[str, Any]]) -> Path:
    """Write `rows` in the format the file name asks for (a name without suffix = a save_to_disk folder)."""
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows, indent=1))
    elif path.suffix == ".csv":
        cols = list(rows[0])
        path.write_text(",".join(cols) + "\n" + "".join(",".join(str(r[c]) for c in cols) + "\n" for r in rows))
    elif path.suffix == ".parquet":
        datasets.Dataset.from_list(rows).to_parquet(str(path))
    else:
        datasets.Dataset.from_list(rows).save_to_disk(str(path))
    return path


def ready(char_tok, **kwargs) -> PromptDataModule:
    """A data module with its rows loaded and tokenized (no Trainer needed)."""
    kwargs.setdefault("val_fraction", 0.0)
    dm = PromptDataModule(**kwargs)
    dm.prepare_rows(char_tok)
    return dm


def first_batch(dm: PromptDataModule) -> dict[str, Any]:
    return next(iter(dm.train_dataloader()))


# ------------------------------------------------------------------------------------------------- formats
@pytest.mark.parametrize("name", ["data.jsonl", "data.json", "data.parquet", "data.csv", "saved_dataset"])
def test_reads_every_format_and_keeps_extra_columns(tmp_path, char_tok, name):
    path = write(tmp_path / name, ROWS)
    dm = ready(char_tok, path=str(path), batch_size=3, shuffle=False)
    batch = first_batch(dm)
    assert batch["prompts"] == ["1+2=", "10+20=", "4+4="]
    # every non-prompt column reaches the batch by name (csv has no types: "3" reads back as 3)
    assert [str(a) for a in batch["answer"]] == ["3", "30", "8"]
    assert batch["id"] == [0, 1, 2]
    assert batch["prompt_ids"].shape == batch["prompt_mask"].shape == (3, 6)  # longest prompt "10+20=" is 6 chars


def test_dataset_dict_folder_uses_split_and_val_split(tmp_path, char_tok):
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS),
                          "test": datasets.Dataset.from_list([{"prompt": "9+9=", "answer": "18", "id": 9}])
                          }).save_to_disk(str(tmp_path / "dd"))
    dm = ready(char_tok, path=str(tmp_path / "dd"), val_split="test", batch_size=1)
    assert sorted(r["prompts"] for r in dm.train_rows) == ["1+2=", "10+20=", "4+4="]
    assert [r["prompts"] for r in dm.val_rows] == ["9+9="]
    with pytest.raises(ValueError, match=re.escape("has splits ['train', 'test'], not 'validation'")):
        ready(char_tok, path=str(tmp_path / "dd"), val_split="validation")


def test_nested_columns_survive(tmp_path, char_tok):
    rows = [{"prompt": "a", "meta": {"src": "x", "tags": [1, 2]}}, {"prompt": "bb", "meta": {"src": "y", "tags": []}}]
    dm = ready(char_tok, path=str(write(tmp_path / "n.jsonl", rows)), batch_size=2, shuffle=False)
    assert first_batch(dm)["meta"] == [{"src": "x", "tags": [1, 2]}, {"src": "y", "tags": []}]


# -------------------------------------------------------------------------------------------------- errors
def test_missing_file_is_named(tmp_path):
    missing = tmp_path / "nope" / "train.jsonl"
    with pytest.raises(ValueError, match=re.escape(f"data path {str(missing)!r} does not exist")):
        PromptDataModule(path=str(missing))
    with pytest.raises(ValueError, match=re.escape(f"val_path {str(missing)!r} does not exist")):
        PromptDataModule(path=str(write(tmp_path / "t.jsonl", ROWS)), val_path=str(missing))


def test_missing_prompt_column_lists_the_columns(tmp_path, char_tok):
    path = write(tmp_path / "q.jsonl", [{"question": "1+1=", "answer": "2"}])
    with pytest.raises(ValueError, match=re.escape("has no column 'prompt'; columns are ['answer', 'question']")):
        ready(char_tok, path=str(path))
    dm = ready(char_tok, path=str(path), prompt_column="question", batch_size=1)  # the fix the message suggests
    assert first_batch(dm)["prompts"] == ["1+1="]
    with pytest.raises(ValueError, match="has no column 'completion'"):
        ready(char_tok, path=str(path), prompt_column="question", completion_column="completion")


def test_bad_jsonl_line_is_reported_by_number(tmp_path, char_tok):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "a"}\n\n{"prompt": "b",}\n')  # line 3 has a trailing comma
    with pytest.raises(ValueError, match=re.escape(f"{path}: line 3 is not valid JSON")):
        ready(char_tok, path=str(path))
    bad_json = tmp_path / "bad.json"
    bad_json.write_text('[\n{"prompt": "a"},\n{"prompt": }\n]')
    with pytest.raises(ValueError, match="invalid JSON at line 3"):
        ready(char_tok, path=str(bad_json))
    not_objects = tmp_path / "list.jsonl"
    not_objects.write_text('["a"]\n')
    with pytest.raises(ValueError, match="every record must be a JSON object"):
        ready(char_tok, path=str(not_objects))


@pytest.mark.parametrize("name, text", [("empty.jsonl", ""), ("blank.jsonl", "\n\n"), ("empty.json", "[]")])
def test_empty_file_is_an_error(tmp_path, char_tok, name, text):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ValueError, match=re.escape(f"data {str(path)!r} is empty")):
        ready(char_tok, path=str(path))


def test_unsupported_extension_and_bad_arguments(tmp_path, char_tok):
    txt = tmp_path / "prompts.txt"
    txt.write_text("1+1=\n")
    with pytest.raises(ValueError, match="unsupported extension '.txt'"):
        ready(char_tok, path=str(txt))
    with pytest.raises(ValueError, match="exactly one of `path`"):
        PromptDataModule()
    with pytest.raises(ValueError, match="exactly one of `path`"):
        PromptDataModule(path=str(txt), task="addition")
    with pytest.raises(ValueError, match="batch_size must be a positive integer, got 0"):
        PromptDataModule(task="addition", batch_size=0)
    with pytest.raises(ValueError, match=r"val_fraction must be in \[0, 1\), got 1.0"):
        PromptDataModule(task="addition", val_fraction=1.0)
    with pytest.raises(ValueError, match="unknown task 'subtraction'"):
        PromptDataModule(task="subtraction")


def test_no_tokenizer_is_an_error_and_a_named_one_works():
    with pytest.raises(ValueError, match="has no tokenizer"):
        PromptDataModule(task="addition", num_train=4).setup("fit")
    dm = PromptDataModule(task="addition", num_train=4, num_val=0, batch_size=2, tokenizer="char")
    dm.setup("fit")
    assert dm.tokenizer.pad_token_id == 0 and len(dm.train_rows) == 4


# ------------------------------------------------------------------------------------------ tokenization
def test_left_padding_and_masks(tmp_path, char_tok):
    dm = ready(char_tok, path=str(write(tmp_path / "d.jsonl", ROWS[:2])), batch_size=2, shuffle=False)
    batch = first_batch(dm)
    # "1+2=" is 4 tokens, "10+20=" 6: the short one gets 2 pads (id 0) on the left
    assert batch["prompt_ids"].tolist() == [[0, 0] + char_ids("1+2="), char_ids("10+20=")]
    assert batch["prompt_ids"].tolist()[0] == [0, 0, 20, 14, 21, 32]
    assert batch["prompt_mask"].tolist() == [[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]]
    assert batch["prompt_ids"].dtype == batch["prompt_mask"].dtype == torch.long
    assert "labels" not in batch  # RL batches carry no SFT targets


def test_max_prompt_length_keeps_the_end_and_warns(tmp_path, char_tok):
    rows = [{"prompt": "long context: 12+34="}, {"prompt": "5+6="}]
    with pytest.warns(UserWarning, match="1 train prompt\\(s\\) longer than max_prompt_length=6"):
        dm = ready(char_tok, path=str(write(tmp_path / "d.jsonl", rows)), max_prompt_length=6, batch_size=2,
                   shuffle=False)
    batch = first_batch(dm)
    assert batch["prompt_ids"].tolist() == [char_ids("12+34="), [0, 0] + char_ids("5+6=")]  # the END is kept


def test_chat_messages_go_through_the_chat_template(tmp_path, char_tok):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "7+5="}]
    rows = [{"prompt": messages, "answer": "12"}]
    dm = ready(char_tok, path=str(write(tmp_path / "chat.jsonl", rows)), batch_size=1)
    batch = first_batch(dm)
    text = "system: be brief\nuser: 7+5=\nassistant: "
    assert batch["prompts"] == [text]
    assert batch["prompt_ids"].tolist() == [char_ids(text)]
    assert batch["answer"] == ["12"]
    with pytest.raises(ValueError, match="prompt must be a string or a list of chat messages, got int"):
        ready(char_tok, path=str(write(tmp_path / "int.jsonl", [{"prompt": 7}])))


def test_completion_column_gives_labels_on_completion_tokens_only(tmp_path, char_tok):
    rows = [{"prompt": "1+2=", "completion": "3"}, {"prompt": "10+20=", "completion": "30"}]
    dm = ready(char_tok, path=str(write(tmp_path / "sft.jsonl", rows)), completion_column="completion", batch_size=2,
               shuffle=False)
    batch = first_batch(dm)
    eos, pad = 1, 0
    # prompt + completion + EOS, right-padded; labels -100 on prompt tokens and padding
    assert batch["input_ids"].tolist() == [char_ids("1+2=3") + [eos, pad, pad, pad], char_ids("10+20=30") + [eos]]
    assert batch["attention_mask"].tolist() == [[1] * 6 + [0, 0, 0], [1] * 9]
    assert batch["labels"].tolist() == [[-100] * 4 + char_ids("3") + [eos, -100, -100, -100],
                                        [-100] * 6 + char_ids("30") + [eos]]
    assert batch["completion"] == ["3", "30"]  # the raw column is kept too


def test_max_length_drops_long_pairs_with_a_warning(tmp_path, char_tok):
    rows = [{"prompt": "1+2=", "completion": "3"}, {"prompt": "1+2=", "completion": "three hundred"}]
    with pytest.warns(UserWarning, match="dropped 1 train pair\\(s\\) longer than max_length=8"):
        dm = ready(char_tok, path=str(write(tmp_path / "d.jsonl", rows)), completion_column="completion",
                   max_length=8)
    assert [r["completion"] for r in dm.train_rows] == ["3"]


# ---------------------------------------------------------------------------------------------- splits
def test_val_path(tmp_path, char_tok):
    train, val = write(tmp_path / "train.jsonl", ROWS), write(tmp_path / "val.csv", [{"prompt": "2+2=", "answer": 4}])
    dm = ready(char_tok, path=str(train), val_path=str(val), val_fraction=0.5, batch_size=3, val_batch_size=5)
    assert len(dm.train_rows) == 3  # val_path wins: no rows are held out of train
    batch = next(iter(dm.val_dataloader()))
    assert batch["prompts"] == ["2+2="] and batch["answer"] == [4]


def test_val_fraction_is_a_seeded_disjoint_split(tmp_path, char_tok):
    rows = [{"prompt": f"{i}+0=", "answer": str(i)} for i in range(20)]
    path = str(write(tmp_path / "d.jsonl", rows))
    dm = ready(char_tok, path=path, val_fraction=0.25, batch_size=4)
    train, val = [r["answer"] for r in dm.train_rows], [r["answer"] for r in dm.val_rows]
    assert (len(train), len(val)) == (15, 5)
    assert sorted(train + val, key=int) == [str(i) for i in range(20)]
    assert val == [r["answer"] for r in ready(char_tok, path=path, val_fraction=0.25).val_rows]  # same seed, same split
    assert val != [r["answer"] for r in ready(char_tok, path=path, val_fraction=0.25, seed=1).val_rows]
    assert ready(char_tok, path=path, val_fraction=0.0).val_dataloader() == []  # no validation at all


# ------------------------------------------------------------------------------------------ shuffle, resume
def epoch_prompts(dm: PromptDataModule) -> list[str]:
    return [p for batch in dm.train_dataloader() for p in batch["prompts"]]


def test_seeded_shuffle_is_reproducible_and_changes_per_epoch(tmp_path, char_tok):
    rows = [{"prompt": f"{i}+0="} for i in range(16)]
    path = str(write(tmp_path / "d.jsonl", rows))
    a, b, c = (ready(char_tok, path=path, batch_size=4, seed=s) for s in (7, 7, 8))
    epoch0 = epoch_prompts(a)
    assert epoch0 == epoch_prompts(b) and epoch0 != epoch_prompts(c)
    assert sorted(epoch0) == sorted(r["prompt"] for r in rows) and epoch0 != [r["prompt"] for r in rows]
    epoch1 = epoch_prompts(a)  # the next epoch: a new permutation of the same rows
    assert epoch1 != epoch0 and sorted(epoch1) == sorted(epoch0)
    assert epoch1 == epoch_prompts(b)
    unshuffled = ready(char_tok, path=path, batch_size=4, shuffle=False)
    assert epoch_prompts(unshuffled) == [r["prompt"] for r in rows]


def test_sampler_state_round_trips_mid_epoch(tmp_path, char_tok):
    path = str(write(tmp_path / "d.jsonl", [{"prompt": f"{i}+0="} for i in range(20)]))
    full = ready(char_tok, path=path, batch_size=4)
    expected = list(full.train_dataloader())  # 5 batches, one epoch
    next_epoch = epoch_prompts(full)
    interrupted = ready(char_tok, path=path, batch_size=4)
    it = iter(interrupted.train_dataloader())
    seen = [next(it) for _ in range(2)]
    state = interrupted.state_dict()
    assert state == {"sampler": {"epoch": 0, "consumed": 8}}
    for restore_before_setup in (True, False):
        resumed = PromptDataModule(path=path, batch_size=4, val_fraction=0.0)
        if restore_before_setup:  # Lightning may restore before or after setup: both must work
            resumed.load_state_dict(state)
            resumed.prepare_rows(char_tok)
        else:
            resumed.prepare_rows(char_tok)
            resumed.load_state_dict(state)
        rest = [b["prompts"] for b in resumed.train_dataloader()]
        assert [b["prompts"] for b in seen] + rest == [b["prompts"] for b in expected]
        # and the epoch after the resumed one is the full, normal second epoch
        assert epoch_prompts(resumed) == next_epoch


def test_sampler_skip_applies_once_and_set_epoch_keeps_the_restored_epoch():
    s = ResumableSampler(6, seed=0)
    order = list(s)  # epoch 0
    s.load_state_dict({"epoch": 0, "consumed": 4})
    s.set_epoch(0)  # Lightning announces the restored epoch: the skip stands
    assert list(s) == order[4:]
    assert s.epoch == 1 and sorted(s) == list(range(6))  # the next epoch is whole again


class _RecordPrompts(L.Callback):
    def __init__(self):
        self.seen: list[list[str]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.seen.append(batch["prompts"])


def _fit(root: Path, max_steps: int, ckpt_path: str | None = None, callbacks=()) -> list[list[str]]:
    from rlhf_lightning import SFTModule

    rec = _RecordPrompts()
    dm = PromptDataModule(task="addition", num_train=24, num_val=0, batch_size=4, completion_column="completion")
    trainer = L.Trainer(max_steps=max_steps, default_root_dir=str(root), logger=False, callbacks=[rec, *callbacks],
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=bool(callbacks),
                        limit_val_batches=0, accelerator="cpu", devices=1)
    trainer.fit(SFTModule("tiny"), dm, ckpt_path=ckpt_path)
    return rec.seen


@pytest.mark.filterwarnings("ignore:.*ckpt_path.*callbacks:UserWarning", "ignore:.*dataloader is not resumable")
def test_trainer_resume_sees_the_prompts_the_uninterrupted_run_saw(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    ckpt = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), every_n_train_steps=4, save_top_k=-1)
    full = _fit(tmp_path / "full", 10, callbacks=[ckpt])  # 6 batches per epoch: step 4 is mid-epoch 0
    assert full[:6] != full[6:12] and len(full) == 10
    resumed = _fit(tmp_path / "resumed", 10, ckpt_path=str(tmp_path / "ckpt" / "epoch=0-step=4.ckpt"))
    assert resumed == full[4:]  # the rest of epoch 0, then the same epoch 1


# ------------------------------------------------------------------------------------------- built-in tasks
@pytest.mark.parametrize("task, task_kwargs", [("addition", {"digits": 3}), ("chain", {"num_terms": 3})])
def test_builtin_tasks(char_tok, task, task_kwargs):
    from rlhf_lightning.data.tasks import get_task

    dm = ready(char_tok, task=task, task_kwargs=task_kwargs, num_train=12, num_val=5, batch_size=4, seed=3,
               completion_column="completion")
    examples = get_task(task, **task_kwargs).make_examples(12, seed=3)
    assert sorted(r["prompts"] for r in dm.train_rows) == sorted(e["prompt"] for e in examples)
    assert len(dm.val_rows) == 5 and not {r["prompts"] for r in dm.val_rows} <= {e["prompt"] for e in examples}
    batch = first_batch(dm)
    assert set(batch) >= {"prompt_ids", "prompt_mask", "prompts", "answer", "completion", "input_ids", "labels"}
    for i, completion in enumerate(batch["completion"]):
        targets = [t for t in batch["labels"][i].tolist() if t != -100]
        assert targets == char_ids(completion) + [1]  # the SFT target is the completion then EOS
        assert completion.endswith(batch["answer"][i])  # the last line of a chain is its answer
    if task == "chain":
        assert all("\n" in c for c in batch["completion"])  # one line per partial sum (3 terms -> 2 steps)


# ------------------------------------------------------------------------------------- every row is checked
def good_rows(n: int = 12) -> list[dict[str, Any]]:
    return [{"prompt": f"{i}+1=", "answer": str(i + 1)} for i in range(n)]


def with_bad_last_row(bad: dict[str, Any], n: int = 12) -> list[dict[str, Any]]:
    """n good rows, the last replaced by `bad`: a defect that would only surface in a late batch."""
    return good_rows(n - 1) + [bad]


# (id, the bad last row, what the one-line message says after "<file> line 12: ")
BAD_ROWS = [
    ("empty_prompt", {"prompt": "", "answer": "1"}, "the prompt is empty; every prompt needs text"),
    ("whitespace_prompt", {"prompt": "  \t", "answer": "1"}, "the prompt is empty (whitespace only)"),
    ("missing_reward_column", {"prompt": "11+1="}, "has no value in column 'answer', which other rows fill"),
    ("null_reward_column", {"prompt": "11+1=", "answer": None}, "has a null (None) value in column 'answer'"),
    ("null_prompt", {"prompt": None, "answer": "1"}, "has a null (None) value in column 'prompt'"),
    ("number_prompt", {"prompt": 12, "answer": "1"}, "prompt must be a string or a list of chat messages, got int"),
    ("message_without_role", {"prompt": [{"content": "1+1="}], "answer": "2"},
     "prompt message 0 is not a chat message {role: str, content: str}: {'content': '1+1='}"),
    ("empty_messages", {"prompt": [], "answer": "2"}, "the prompt is an empty list of chat messages"),
]


@pytest.mark.parametrize("bad, problem", [c[1:] for c in BAD_ROWS], ids=[c[0] for c in BAD_ROWS])
def test_a_bad_row_near_the_end_fails_at_load_with_its_line(tmp_path, bad, problem):
    path = write(tmp_path / "d.jsonl", with_bad_last_row(bad))
    with pytest.raises(ConfigError) as err:
        PromptDataModule(path=str(path))  # in __init__: before any model is loaded
    assert str(err.value).startswith(f"{path} line 12: {problem}"), str(err.value)


def test_line_numbers_count_blank_lines_and_csv_lines(tmp_path):
    path = tmp_path / "gaps.jsonl"
    path.write_text('{"prompt": "1+1="}\n\n\n{"prompt": " "}\n')
    with pytest.raises(ConfigError, match=re.escape(f"{path} line 4: the prompt is empty")):
        PromptDataModule(path=str(path))
    csv_path = tmp_path / "d.csv"  # header line 1, then rows 2..; the empty cell is read as a null
    csv_path.write_text("prompt,answer\n1+1=,2\n2+2=,4\n\n3+3=,\n")
    with pytest.raises(ConfigError, match=re.escape(f"{csv_path} line 5: has a null (None) value in column "
                                                    f"'answer'")):
        PromptDataModule(path=str(csv_path))
    listed = write(tmp_path / "d.json", good_rows(3) + [{"prompt": ""}])
    with pytest.raises(ConfigError, match=re.escape(f"{listed} record 3: has no value in column 'answer'")):
        PromptDataModule(path=str(listed))


def test_folders_and_val_files_are_checked_too(tmp_path, char_tok):
    folder = write(tmp_path / "saved", with_bad_last_row({"prompt": "", "answer": "1"}))
    dm = PromptDataModule(path=str(folder), val_fraction=0.0)  # folders are read in setup
    with pytest.raises(ConfigError, match=re.escape(f"{folder} row 11: the prompt is empty")):
        dm.prepare_rows(char_tok)
    datasets.DatasetDict({"train": datasets.Dataset.from_list(good_rows(3)),
                          "test": datasets.Dataset.from_list([{"prompt": "1+1=", "answer": "2"}, {"prompt": "\n",
                                                                                                  "answer": "4"}])
                          }).save_to_disk(str(tmp_path / "dd"))
    dm = PromptDataModule(path=str(tmp_path / "dd"), val_split="test")
    with pytest.raises(ConfigError, match=re.escape(f"{tmp_path / 'dd'} (split 'test') row 1: the prompt is empty")):
        dm.prepare_rows(char_tok)
    val = write(tmp_path / "val.jsonl", [{"prompt": "1+1=", "answer": "2"}, {"prompt": "2+2="}])
    with pytest.raises(ConfigError, match=re.escape(f"{val} line 2: has no value in column 'answer'")):
        PromptDataModule(path=str(write(tmp_path / "t.jsonl", good_rows())), val_path=str(val))


def test_sft_completions_are_checked(tmp_path, char_tok):
    rows = [{"prompt": f"{i}+1=", "completion": str(i + 1)} for i in range(11)] + [{"prompt": "x", "completion": " "}]
    path = write(tmp_path / "sft.jsonl", rows)
    with pytest.raises(ConfigError, match=re.escape(f"{path} line 12: the completion (column 'completion') is "
                                                    "empty (whitespace only)")):
        PromptDataModule(path=str(path), completion_column="completion")
    # an assistant reply as chat messages is its text (was `str(list)`: the repr became the target)
    chat = [{"prompt": "1+2=", "completion": [{"role": "assistant", "content": "3"}]}]
    dm = ready(char_tok, path=str(write(tmp_path / "chat.jsonl", chat)), completion_column="completion", batch_size=1)
    assert dm.train_rows[0]["_target_ids"] == char_ids("3") + [char_tok.eos_token_id]


def test_a_prompt_without_tokens_is_an_error(tmp_path):
    from rlhf_lightning.tokenizer import build_char_tokenizer

    class DropsEverything:  # a tokenizer that yields no ids for some text (e.g. only characters it strips)
        def __init__(self):
            self.inner = build_char_tokenizer()

        def __call__(self, text, **kw):
            return {"input_ids": [] if text == "~" else self.inner(text, **kw)["input_ids"]}

    dm = PromptDataModule(path=str(write(tmp_path / "d.jsonl", good_rows(3) + [{"prompt": "~", "answer": "1"}])),
                          val_fraction=0.0, shuffle=False)
    with pytest.raises(ConfigError, match="line 4: the prompt '~' has no tokens"):
        dm.prepare_rows(DropsEverything())


def test_unknown_characters_warn_once_with_the_characters_and_the_row_count(tmp_path, char_tok):
    rows = good_rows(10) + [{"prompt": "3\t+4=", "answer": "7"}, {"prompt": "zwölf+1=", "answer": "13"},
                            {"prompt": "<unk> is spelled, not lost", "answer": "0"}]
    path = write(tmp_path / "d.jsonl", rows)
    with pytest.warns(UserWarning) as record:
        ready(char_tok, path=str(path), shuffle=False)
    messages = [str(w.message) for w in record if "does not know" in str(w.message)]
    assert messages == [f"2 train row(s) contain characters the tokenizer does not know, which become '<unk>' (the "
                        f"model cannot read or write them): '\\t', 'ö' (first: {path} line 11); use a tokenizer "
                        f"that covers them or clean the data"]


def test_truncation_warning_names_the_longest_prompt(tmp_path, char_tok):
    rows = [{"prompt": "5+6="}, {"prompt": "long context: 12+34="}]
    path = write(tmp_path / "d.jsonl", rows)
    with pytest.warns(UserWarning, match=re.escape(f"(the longest, {path} line 2, has 20); raise "
                                                   "data.max_prompt_length")):
        ready(char_tok, path=str(path), max_prompt_length=6)


def test_val_fraction_that_leaves_no_training_rows_is_refused(tmp_path, char_tok):
    dm = PromptDataModule(path=str(write(tmp_path / "d.jsonl", good_rows(3))), val_fraction=0.9)
    with pytest.raises(ConfigError, match=re.escape("data.val_fraction=0.9 holds out 3 of the 3 rows")):
        dm.prepare_rows(char_tok)


@pytest.mark.parametrize("column", ["completions", "columns", "prompt_ids"])
def test_a_column_named_like_a_batch_key_is_refused(tmp_path, column):
    """e.g. `completions` would collide with the reward functions' own argument, `columns` would replace the
    reward batch's columns, `prompt_ids` the token ids."""
    path = write(tmp_path / "d.jsonl", [{"prompt": "1+1=", column: "2"}])
    with pytest.raises(ConfigError, match=re.escape(f"has a column named {column!r}, a name the batches and reward "
                                                    f"functions already use")):
        PromptDataModule(path=str(path))
    assert PromptDataModule(path=str(path), prompt_column=column)  # as the prompt column it is not kept: no clash


@pytest.mark.parametrize("argument", [dict(num_train=100), dict(num_val=10), dict(task_kwargs={"digits": 3})])
def test_task_only_arguments_with_path_data_are_refused(tmp_path, argument):
    path = str(write(tmp_path / "d.jsonl", good_rows(3)))
    name, value = next(iter(argument.items()))
    with pytest.raises(ValueError, match=re.escape(f"data.{name}={value!r} applies to built-in tasks (`task`) only")):
        PromptDataModule(path=path, **argument)  # was: silently ignored, every row used
    from rlhf_lightning.data import PreferenceDataModule

    with pytest.raises(ValueError, match=re.escape(f"data.{name}={value!r} applies to built-in tasks")):
        PreferenceDataModule(path=path, **argument)
