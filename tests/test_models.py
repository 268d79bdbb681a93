"""Model loading: presets, `save_pretrained` directories and hub ids go through one path (`load_causal_lm`)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from conftest import char_ids
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM, LlamaForSequenceClassification

from rlhf_lightning.models import PRESETS, load_causal_lm, load_sequence_classifier, model_source, resolve_dtype
from rlhf_lightning.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory) -> Path:
    """A tiny preset policy and the char tokenizer written with save_pretrained, as an SFT export would be."""
    from rlhf_lightning.tokenizer import build_char_tokenizer

    out = tmp_path_factory.mktemp("tiny_export")
    tok = build_char_tokenizer()
    load_causal_lm("tiny", tok, seed=3).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_preset_matches_char_tokenizer(preset, char_tok):
    model = load_causal_lm(preset, char_tok)
    cfg = model.config
    assert isinstance(model, LlamaForCausalLM)
    assert cfg.vocab_size == len(char_tok) == 99
    assert (cfg.pad_token_id, cfg.eos_token_id) == (char_tok.pad_token_id, char_tok.eos_token_id) == (0, 1)
    assert (model.generation_config.pad_token_id, model.generation_config.eos_token_id) == (0, 1)
    for key, value in PRESETS[preset].items():
        assert getattr(cfg, key) == value
    assert model.get_input_embeddings().weight.shape == (99, PRESETS[preset]["hidden_size"])
    if preset == "medium":  # the ~100M one: 12 x (4*768^2 attention + 3*768*3072 MLP + 2*768 norms) + 768 final norm
        n = 12 * (4 * 768**2 + 3 * 768 * 3072 + 2 * 768) + 768 + 99 * 768  # + one tied 99 x 768 embedding
        assert sum(p.numel() for p in model.parameters()) == n == 113_341_440
    if preset == "tiny":  # the forward pass works end to end on char ids: [B, T] -> [B, T, V]
        ids = torch.tensor([char_tok.encode("12+34=")])
        assert model(input_ids=ids).logits.shape == (1, 6, 99)


def test_preset_without_tokenizer_uses_char_vocab():
    assert load_causal_lm("tiny").config.vocab_size == 99


def test_preset_init_is_seeded_and_leaves_global_rng_alone(char_tok):
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    a = load_causal_lm("tiny", char_tok, seed=0)
    after = torch.rand(3)
    b = load_causal_lm("tiny", char_tok, seed=0)
    c = load_causal_lm("tiny", char_tok, seed=1)
    assert torch.equal(before, after)  # building a preset does not consume the caller's random stream
    wa, wb, wc = (m.model.layers[0].mlp.up_proj.weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)


def test_save_pretrained_dir_loads_through_same_path_with_identical_logits(tiny_export, char_tok):
    original = load_causal_lm("tiny", char_tok, seed=3).eval()
    assert model_source(str(tiny_export)) == "local"
    reloaded = load_causal_lm(str(tiny_export), load_tokenizer(str(tiny_export))).eval()
    assert isinstance(reloaded, LlamaForCausalLM)
    ids = torch.tensor([char_tok.encode("47+85="), char_tok.encode("1+2=99")])  # [2, 6]
    with torch.no_grad():
        assert torch.equal(original(input_ids=ids).logits, reloaded(input_ids=ids).logits)
    hf = AutoModelForCausalLM.from_pretrained(tiny_export).eval()  # and plain transformers agrees
    with torch.no_grad():
        assert torch.equal(hf(input_ids=ids).logits, reloaded(input_ids=ids).logits)


def test_exported_tokenizer_round_trips_beside_its_model(tiny_export):
    # model config.json and tokenizer in one folder (what every module exports): AutoTokenizer must still give the
    # char tokenizer, spaces and newlines included (a qwen2 config would make it pick Qwen2Tokenizer, which drops them)
    text = "user: 7+5=\nassistant: 12"
    for tok in (load_tokenizer(str(tiny_export)), AutoTokenizer.from_pretrained(tiny_export)):
        assert (tok.pad_token_id, tok.eos_token_id, len(tok)) == (0, 1, 99)
        assert tok.encode(text) == char_ids(text)
        assert tok.decode(tok.encode(text)) == text
    assert load_tokenizer(str(tiny_export)).padding_side == "left"


def test_torch_dtype_applies_to_presets_and_directories(tiny_export, char_tok):
    assert next(load_causal_lm("tiny", char_tok, torch_dtype="bf16").parameters()).dtype == torch.bfloat16
    assert next(load_causal_lm(str(tiny_export), torch_dtype="bfloat16").parameters()).dtype == torch.bfloat16
    assert resolve_dtype(None) is None and resolve_dtype(torch.float16) is torch.float16
    with pytest.raises(ValueError, match="unknown dtype 'float8'"):
        resolve_dtype("float8")


def test_bad_paths_raise_value_error_naming_the_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=r"'\./nope' does not exist"):
        load_causal_lm("./nope")
    a_file = tmp_path / "weights.bin"
    a_file.write_bytes(b"\0")
    with pytest.raises(ValueError, match=re.escape(repr(str(a_file))) + " is a file"):
        load_causal_lm(str(a_file))
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    with pytest.raises(ValueError, match=re.escape(repr(str(empty))) + " has no config.json"):
        load_causal_lm(str(empty))
    with pytest.raises(ValueError, match=re.escape(repr(str(empty))) + " has no config.json"):
        load_sequence_classifier(str(empty))
    with pytest.raises(ValueError, match="model_name_or_path must be a preset"):
        load_causal_lm("")


def test_broken_local_checkpoint_raises_value_error(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=re.escape(f"could not load causal LM from {str(tmp_path)!r}")):
        load_causal_lm(str(tmp_path))


def test_model_source_classifies_without_network(tmp_path):
    assert model_source("tiny") == "preset"
    assert model_source("Qwen/Qwen2.5-0.5B") == "hub"
    assert model_source("gpt2") == "hub"
    with pytest.raises(ValueError, match="does not exist"):
        model_source("runs/sft/version_0/hf_model")  # two slashes: a path, never a hub id


def test_sequence_classifier_from_causal_lm_export(tiny_export, char_tok):
    rm = load_sequence_classifier(str(tiny_export), char_tok).eval()
    lm = load_causal_lm(str(tiny_export)).eval()
    assert isinstance(rm, LlamaForSequenceClassification)
    assert rm.config.num_labels == 1 and rm.config.pad_token_id == 0
    assert rm.score.weight.shape == (1, PRESETS["tiny"]["hidden_size"])  # a fresh scalar head
    # the backbone is the causal LM's, weight for weight
    lm_state = lm.model.state_dict()
    for name, tensor in rm.model.state_dict().items():
        assert torch.equal(tensor, lm_state[name]), name
    # batched, left-padded scoring reads the last real token: same scores as one sequence at a time
    texts = ["1+2=3", "47+85=132"]
    batch = char_tok(texts, padding=True, return_tensors="pt")  # [2, 9], row 0 left-padded by 4
    assert batch["input_ids"][0, :4].tolist() == [0, 0, 0, 0]
    with torch.no_grad():
        scores = rm(**batch).logits  # [2, 1]
        single = [rm(input_ids=torch.tensor([char_tok.encode(t)])).logits for t in texts]
    assert scores.shape == (2, 1)
    torch.testing.assert_close(scores, torch.cat(single), rtol=1e-5, atol=1e-5)


def test_sequence_classifier_preset(char_tok):
    rm = load_sequence_classifier("tiny", char_tok, seed=0)
    assert isinstance(rm, LlamaForSequenceClassification) and rm.config.num_labels == 1
    assert rm.config.pad_token_id == 0 and rm.config.vocab_size == 99
    # seeded: the same seed gives the same head
    assert torch.equal(rm.score.weight, load_sequence_classifier("tiny", char_tok, seed=0).score.weight)


def test_a_causal_lm_folder_is_not_a_reward_model(tiny_export, char_tok, tmp_path):
    """Used as a reward, a folder without a trained score head would score at random: refused, in every place that
    takes a reward model (the loader, GRPO's scorer, PPO's reward model, the iterative callback's scorer)."""
    from rlhf_lightning import GRPOModule, PPOModule
    from rlhf_lightning.modules.reward_model import RewardModelScorer

    expected = (f"reward model {str(tiny_export)!r} is not a reward model: it has no trained score head (score.weight "
                f"missing, so it would score at random; a causal-LM folder such as an SFT export?); train one with "
                f"RewardModel and pass its hf_model export")
    with pytest.raises(ValueError, match=re.escape(expected)):
        load_sequence_classifier(str(tiny_export), char_tok, require_trained_head=True)
    with pytest.raises(ValueError, match=re.escape(expected)):
        RewardModelScorer(str(tiny_export))  # GRPOModule(reward_model=...) and the iterative callback use it
    with pytest.raises(ValueError, match=re.escape(expected)):
        GRPOModule("tiny", reward_model=str(tiny_export))
    with pytest.raises(ValueError, match=re.escape(expected)):
        PPOModule("tiny", reward_model=str(tiny_export))
    # a sequence classifier with its head passes, and a causal LM is still a fine start for RewardModel training
    rm_dir = tmp_path / "rm"
    load_sequence_classifier("tiny", char_tok).save_pretrained(rm_dir)
    char_tok.save_pretrained(rm_dir)
    assert RewardModelScorer(str(rm_dir))(["1+1="], ["2"])
    assert load_sequence_classifier(str(tiny_export), char_tok).score.weight.shape[0] == 1
