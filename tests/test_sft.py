"""SFTModule: loss on completion tokens only, it learns, and its `hf_model/` export reloads with plain transformers."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from conftest import char_ids

from rlhf_lightning import PromptDataModule, SFTModule


@pytest.fixture(scope="module")
def module() -> SFTModule:
    return SFTModule("tiny", seed=0)


def hand_batch(pairs: list[tuple[str, str]]) -> dict[str, torch.Tensor]:
    """(prompt, completion) pairs as SFT rows: prompt + completion + EOS, right-padded, labels -100 on the prompt."""
    seqs = [char_ids(p) + char_ids(c) + [1] for p, c in pairs]
    L_ = max(map(len, seqs))
    input_ids = torch.tensor([s + [0] * (L_ - len(s)) for s in seqs])  # [B, L]
    attention_mask = torch.tensor([[1] * len(s) + [0] * (L_ - len(s)) for s in seqs])
    labels = torch.tensor([[-100] * len(p) + s[len(p):] + [-100] * (L_ - len(s)) for (p, _), s in zip(pairs, seqs)])
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def per_token_nll(model, ids: list[int]) -> torch.Tensor:
    """-log p(ids[t] | ids[:t]) for t = 1..T-1 from one unpadded forward pass: [T-1]."""
    logits = model(input_ids=torch.tensor([ids])).logits[0]  # [T, V]
    return -torch.log_softmax(logits[:-1].double(), -1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]


@torch.no_grad()
def test_loss_is_mean_cross_entropy_over_completion_tokens(module):
    module.policy.eval()
    batch = hand_batch([("47+85=", "132")])
    ids = char_ids("47+85=132") + [1]
    nll = per_token_nll(module.policy, ids)  # predictions of tokens 1..9
    expected = nll[5:].mean()  # the 4 targets "1", "3", "2", EOS sit at positions 6..9 and are predicted at 5..8
    torch.testing.assert_close(module.sft_loss(batch).double(), expected, rtol=1e-5, atol=1e-6)


@torch.no_grad()
def test_padded_batch_is_a_token_mean_over_both_rows(module):
    module.policy.eval()
    pairs = [("1+2=", "3"), ("47+85=", "132")]
    nlls = [per_token_nll(module.policy, char_ids(p) + char_ids(c) + [1])[len(p) - 1:] for p, c in pairs]
    expected = torch.cat(nlls).mean()  # (2 + 4 target tokens) / 6, not a mean of per-row means
    assert [len(n) for n in nlls] == [2, 4]
    torch.testing.assert_close(module.sft_loss(hand_batch(pairs)).double(), expected, rtol=1e-5, atol=1e-6)


def test_prompt_tokens_get_no_gradient(module):
    """Changing what the model predicts at prompt positions (their logits) cannot change the loss."""
    module.policy.eval()
    batch = hand_batch([("47+85=", "132")])  # 10 tokens, the first 6 are the prompt
    captured = {}

    def keep(_mod, _inp, out):
        out.retain_grad()
        captured["logits"] = out

    handle = module.policy.lm_head.register_forward_hook(keep)
    try:
        module.sft_loss(batch).backward()
    finally:
        handle.remove()
        module.policy.zero_grad(set_to_none=True)
    grad = captured["logits"].grad[0].abs().sum(-1)  # [L]
    # position t predicts token t+1: positions 0..4 predict prompt tokens, 5..8 the completion, 9 nothing
    assert torch.all(grad[:5] == 0) and grad[9] == 0
    assert torch.all(grad[5:9] > 0)


@torch.no_grad()
def test_prompt_labels_are_ignored_but_completion_labels_count(module):
    module.policy.eval()
    batch = hand_batch([("47+85=", "132")])
    base = module.sft_loss(batch)
    same = {**batch, "labels": batch["labels"].clone()}
    same["input_ids"] = batch["input_ids"].clone()
    same["labels"][0, 2] = -100  # already ignored: a prompt label stays ignored whatever it is
    assert torch.equal(module.sft_loss(same), base)
    changed = {**batch, "labels": batch["labels"].clone()}
    changed["labels"][0, 7] = char_ids("9")[0]  # a completion label: the loss moves
    assert not torch.equal(module.sft_loss(changed), base)


def test_missing_labels_is_a_clear_error(module):
    with pytest.raises(ValueError, match="set data.completion_column"):
        module.sft_loss({"prompt_ids": torch.zeros(1, 3, dtype=torch.long)})


class _Losses(L.Callback):
    def __init__(self):
        self.values: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.values.append(float(outputs["loss"]))


@pytest.mark.slow  # ~10 s alone, more on a loaded 2-core machine
def test_sft_lowers_loss_and_export_reloads_with_same_greedy_completions(tmp_path, trainer_kwargs):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    L.seed_everything(0)
    model = SFTModule("tiny", lr=3e-3, warmup_steps=5, seed=0)
    dm = PromptDataModule(task="addition", task_kwargs={"digits": 2}, num_train=640, num_val=16, batch_size=16,
                          val_batch_size=16, completion_column="completion")
    losses = _Losses()
    trainer = L.Trainer(max_steps=40, limit_val_batches=0, callbacks=[losses], **trainer_kwargs)
    trainer.fit(model, dm)

    assert len(losses.values) == 40 and model.optimizer_steps == 40
    first, last = sum(losses.values[:5]) / 5, sum(losses.values[-5:]) / 5
    assert first > 0.8 * math.log(99)  # starts near uniform over the 99-token vocabulary
    assert last < 0.6 * first, (first, last)  # ~4.1 -> ~1.9 nats: digits, then EOS, are quickly learned

    export = tmp_path / "hf_model"
    reloaded = AutoModelForCausalLM.from_pretrained(export).eval()
    tok = AutoTokenizer.from_pretrained(export)
    assert (tok.pad_token_id, tok.eos_token_id) == (0, 1)
    trained = model.policy.state_dict()
    assert all(torch.equal(v, trained[k]) for k, v in reloaded.state_dict().items())

    model.policy.eval()
    batch = next(iter(dm.val_dataloader()))  # 16 left-padded prompts
    ours = model.greedy_completions(batch, max_new_tokens=4)
    with torch.no_grad():
        out = reloaded.generate(input_ids=batch["prompt_ids"], attention_mask=batch["prompt_mask"], do_sample=False,
                                max_new_tokens=4, pad_token_id=0, eos_token_id=1)
    theirs = tok.batch_decode(out[:, batch["prompt_ids"].shape[1]:], skip_special_tokens=True)
    assert ours == theirs
    assert all(c.isdigit() and len(c) < 4 for c in ours)  # already a number, then EOS (not 4 tokens of anything)
