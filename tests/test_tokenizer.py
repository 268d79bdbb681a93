from __future__ import annotations

import pathlib

import huggingface_hub.constants
import pytest
from tokenizers import Tokenizer, decoders, models
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from rlhf_lightning.infra.paths import looks_like_path
from rlhf_lightning.tokenizer import CHARS, build_char_tokenizer, load_tokenizer


@pytest.fixture(scope="module")
def tok():
    return build_char_tokenizer()


def test_ids_are_fixed(tok):
    # specials first, then printable ASCII in code-point order (id = ord(c) - 32 + 3), newline last
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    assert tok.pad_token_id != tok.eos_token_id
    assert tok.bos_token is None
    assert len(tok) == 99 and len(CHARS) == 96
    assert tok.convert_tokens_to_ids([" ", "0", "A", "~", "\n"]) == [3, 19, 36, 97, 98]
    assert tok.encode("12+3=") == [20, 21, 14, 22, 32]  # no BOS/EOS added
    assert tok.padding_side == "left"
    assert tok.model_max_length >= 100_000


@pytest.mark.parametrize("text", [
    "", "47+85=", "  two  spaces  ", "a , b . c 's n't", "line1\nline2\n\n", "7+5=12\n12-3=9",
    "".join(CHARS), "<>{}[]|\\`~!@#$%^&*()_-+=;:'\",./?",
])
def test_decode_round_trips_exactly(tok, text):
    ids = tok.encode(text)
    assert len(ids) == len(text)  # one token per character
    assert tok.decode(ids) == text
    assert tok.batch_decode([ids]) == [text]


def test_special_and_unknown_tokens(tok):
    ids = tok.encode("9<eos>")
    assert ids == [28, 1]  # "<eos>" in text is the eos token, not five characters
    assert tok.decode(ids, skip_special_tokens=True) == "9"
    assert tok.encode("a\tb") == [68, 2, 69]  # tab is outside the vocabulary -> <unk>
    assert tok.decode([0, 0, 68, 1], skip_special_tokens=True) == "a"


def test_left_padding(tok):
    batch = tok(["a", "abc"], padding=True)
    assert batch["input_ids"] == [[0, 0, 68], [68, 69, 70]]
    assert batch["attention_mask"] == [[0, 0, 1], [1, 1, 1]]


def test_chat_template(tok):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "1+1="}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == "system: be brief\nuser: 1+1=\nassistant: "
    assert tok.apply_chat_template(messages[1:], tokenize=False) == "user: 1+1=\n"
    ids = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=False)
    assert list(ids) == tok.encode(text)


def test_save_and_load_give_the_same_tokenizer(tok, tmp_path):
    tok.save_pretrained(tmp_path)
    for loaded in (AutoTokenizer.from_pretrained(tmp_path), load_tokenizer(str(tmp_path)), load_tokenizer(tmp_path)):
        assert loaded.get_vocab() == tok.get_vocab()
        assert (loaded.pad_token_id, loaded.eos_token_id, loaded.unk_token_id) == (0, 1, 2)
        assert loaded.bos_token is None
        assert loaded.padding_side == "left"
        assert loaded.chat_template == tok.chat_template
        assert loaded.model_max_length == tok.model_max_length
        text = " a,b .\n12-3=9 "
        assert loaded.encode(text) == tok.encode(text)
        assert loaded.decode(loaded.encode(text)) == text


def test_load_char_and_presets(monkeypatch):
    import rlhf_lightning.models as models_mod

    monkeypatch.setitem(models_mod.PRESETS, "my-preset", {})  # any preset name maps to the char tokenizer
    for name in (None, "char", "tiny", "my-preset"):
        loaded = load_tokenizer(name)
        assert len(loaded) == 99 and loaded.pad_token_id == 0 and loaded.padding_side == "left"


def test_path_errors(tmp_path):
    with pytest.raises(ValueError, match=r"'\./no_such_dir' does not exist"):
        load_tokenizer("./no_such_dir")
    with pytest.raises(ValueError, match="does not exist"):
        load_tokenizer(str(tmp_path / "missing"))  # parent exists, leaf does not
    with pytest.raises(ValueError, match="does not exist"):
        load_tokenizer("a/b/c")  # hub ids have at most one '/'
    (tmp_path / "file.json").write_text("{}")
    with pytest.raises(ValueError, match="is a file"):
        load_tokenizer(str(tmp_path / "file.json"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="could not load a tokenizer from directory"):
        load_tokenizer(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="non-empty string"):
        load_tokenizer("")


@pytest.mark.parametrize("name, is_path", [
    ("gpt2", False), ("Qwen/Qwen2.5-0.5B", False), ("openai/gsm8k", False),  # hub ids: `name` or `org/name`
    ("./x", True), ("../x", True), (".", True), ("~/x", True), ("/abs/x", True),
    ("x.jsonl", True), ("x.json", True), ("data/train.parquet", True), ("rows.CSV", True),  # data files
    ("runs/sft/version_0/hf_model", True),  # more than one '/'
    ("C:\\x", True), ("C:/x", True), ("org\\name", True),  # Windows paths
])
def test_one_rule_tells_a_local_path_from_a_hub_id(name, is_path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no folder here shares a name with a hub org
    assert looks_like_path(name) is is_path


def test_a_name_whose_folder_exists_here_is_a_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert not looks_like_path("runs/x")
    (tmp_path / "runs").mkdir()
    assert looks_like_path("runs/x")  # `./runs` exists: a local folder, not the hub org "runs"


def test_models_tokenizers_and_data_use_the_same_rule(tmp_path, monkeypatch):
    """A missing name the rule calls a path is "does not exist" at once for all three, never a hub lookup."""
    from rlhf_lightning import PromptDataModule
    from rlhf_lightning.models import model_source

    monkeypatch.chdir(tmp_path)
    for name in ("./x", "a/b/c", "x.jsonl", "C:\\x"):
        with pytest.raises(ValueError, match="does not exist"):
            load_tokenizer(name)
        with pytest.raises(ValueError, match="does not exist"):
            model_source(name)
        with pytest.raises(ValueError, match="does not exist"):
            PromptDataModule(path=name)


def test_hub_id_offline_is_one_clear_error(monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ValueError, match=r"'someorg/somemodel' was not found locally .*no network") as info:
        load_tokenizer("someorg/somemodel")
    assert "\n" not in str(info.value)


def _save_without_pad(path: pathlib.Path, eos: str | None) -> None:
    backend = Tokenizer(models.WordLevel(vocab={"<unk>": 0, "<eos>": 1, "a": 2}, unk_token="<unk>"))
    backend.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token=eos, padding_side="right")
    tok.save_pretrained(path)


def test_missing_pad_falls_back_to_eos(tmp_path):
    _save_without_pad(tmp_path, eos="<eos>")
    with pytest.warns(UserWarning, match="no pad token"):
        loaded = load_tokenizer(str(tmp_path))
    assert loaded.pad_token == "<eos>" and loaded.pad_token_id == 1
    assert loaded.padding_side == "left"  # forced, although saved as "right"


def test_missing_pad_and_eos_is_an_error(tmp_path):
    _save_without_pad(tmp_path, eos=None)
    with pytest.raises(ValueError, match="neither a pad nor an eos token"):
        load_tokenizer(str(tmp_path))
