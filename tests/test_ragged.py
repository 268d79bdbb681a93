"""Ragged rollouts (issue 19): padding columns left out of the forward passes, token-budget micro-batches, and the
same log-probs, gradients and updates as the padded passes (to float rounding)."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from rlhf_lightning import GRPOModule, PPOModule, PromptDataModule
from rlhf_lightning.models import load_causal_lm
from rlhf_lightning.modules.rl import token_budget_chunks
from rlhf_lightning.rollout import completion_logprobs
from rlhf_lightning.rollout.base import trim_padding
from rlhf_lightning.tokenizer import build_char_tokenizer


def _ragged_batch(extra_prompt_pad=3, extra_completion_pad=5):
    """4 rows, prompts of 2-5 tokens (left-padded) and completions of 1-6 tokens (right-padded), with columns of
    padding in every row on both sides."""
    g = torch.Generator().manual_seed(0)
    p_lens, c_lens = [5, 2, 4, 3], [6, 1, 3, 4]
    P, T = max(p_lens) + extra_prompt_pad, max(c_lens) + extra_completion_pad
    p_ids, p_mask = torch.zeros(4, P, dtype=torch.long), torch.zeros(4, P, dtype=torch.long)
    c_ids, c_mask = torch.zeros(4, T, dtype=torch.long), torch.zeros(4, T, dtype=torch.long)
    for i, (p, c) in enumerate(zip(p_lens, c_lens)):
        p_ids[i, P - p:] = torch.randint(3, 90, (p,), generator=g)
        p_mask[i, P - p:] = 1
        c_ids[i, :c] = torch.randint(3, 90, (c,), generator=g)
        c_mask[i, :c] = 1
    return p_ids, p_mask, c_ids, c_mask


def test_trim_padding_drops_only_columns_that_are_padding_everywhere():
    p_ids, p_mask, c_ids, c_mask = _ragged_batch()
    tp_ids, tp_mask, tc_ids, tc_mask = trim_padding(p_ids, p_mask, c_ids, c_mask)
    assert tp_ids.shape == (4, 5) and tc_ids.shape == (4, 6)
    assert int(tp_mask.sum()) == int(p_mask.sum()) and int(tc_mask.sum()) == int(c_mask.sum())
    assert bool(tp_mask[:, -1].all())  # still left-padded: the last prompt column is real in every row


def test_trimmed_logprobs_and_gradients_equal_the_padded_ones():
    """completion_logprobs on a batch with extra all-padding columns == on the trimmed batch, values and
    gradients (the trim happens inside; here the padded forward is run by hand for the reference)."""
    from rlhf_lightning.rollout.base import join_prompt_completion
    from rlhf_lightning.rollout.logprobs import token_logprobs

    model = load_causal_lm("tiny", build_char_tokenizer(), seed=0)
    model.eval()
    p_ids, p_mask, c_ids, c_mask = _ragged_batch()
    T = c_ids.size(1)
    # reference: the forward over every column, padding included
    ids, attn, pos = join_prompt_completion(p_ids, p_mask, c_ids, c_mask)
    logits = model(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=False, logits_to_keep=T + 1).logits
    ref, _ = token_logprobs(logits[:, :-1], c_ids, c_mask)
    ref.sum().backward()
    ref_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    got = completion_logprobs(model, p_ids, p_mask, c_ids, c_mask)  # trims internally
    assert got.shape == ref.shape
    assert torch.allclose(got, ref, atol=1e-5)
    got.sum().backward()
    for (name, p), r in zip(model.named_parameters(), ref_grads):
        assert torch.allclose(p.grad, r, atol=1e-5, rtol=1e-4), name


def test_token_budget_chunks_by_hand():
    rows = torch.arange(6)
    prompt = torch.tensor([4, 4, 4, 4, 4, 4])
    completion = torch.tensor([10, 2, 30, 3, 8, 1])
    chunks = [c.tolist() for c in token_budget_chunks(rows, prompt, completion, budget=40, max_rows=10)]
    # longest first: 2 (34) alone; 0 (14) + 4 (12): 2 x 14 = 28, + 3 (7): 3 x 14 = 42 > 40 -> new chunk
    assert chunks == [[2], [0, 4], [3, 1, 5]]
    assert sum(chunks, []) == [2, 0, 4, 3, 1, 5]
    chunks = [c.tolist() for c in token_budget_chunks(rows, prompt, completion, budget=1000, max_rows=2)]
    assert chunks == [[2, 0], [4, 3], [1, 5]]  # micro_batch_size still caps the rows


def _fit(module, steps=2, batch_size=4):
    torch.manual_seed(0)
    dm = PromptDataModule(task="addition", batch_size=batch_size, num_train=32, num_val=4)
    per_rollout, optimizers = module.updates_per_batch()
    L.Trainer(max_steps=steps * per_rollout * optimizers, accelerator="cpu", logger=False, enable_checkpointing=False,
              enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
              limit_val_batches=0).fit(module, datamodule=dm)
    return module


@pytest.mark.parametrize("cls", ["grpo", "ppo", "ppo_one_epoch"])
def test_token_budget_micro_batches_train_like_one_padded_batch(cls, monkeypatch):
    """The same seeded run with and without max_tokens_per_micro_batch: identical rollouts, the forward passes
    split into short micro-batches (each narrower than the rollout), and the weights after 2 rollouts agree to
    float rounding (gradient accumulation over the micro-batches == one padded batch). PPO at one epoch: the
    padded run takes π_old / V_old from its update's forward (`fuses_old_passes`), the budgeted one cannot."""
    from rlhf_lightning.rollout import base

    widths = []  # (columns given, columns the forward ran) of every pass

    def spy(*tensors):
        out = base.trim_padding(*tensors)
        widths.append((tensors[0].size(1) + tensors[2].size(1), out[0].size(1) + out[2].size(1)))
        return out

    def build(**kw):
        common = dict(max_new_tokens=24 if cls == "grpo" else 64, temperature=1.5, lr=1e-3, seed=0, **kw)
        if cls == "grpo":
            return GRPOModule("tiny", group_size=4, beta=0.04, num_iterations=2, **common)
        return PPOModule("tiny", ppo_epochs=1 if cls == "ppo_one_epoch" else 2, **common)

    rows = 4 if cls == "grpo" else 16  # prompts per rollout (GRPO: x group_size 4)
    padded = _fit(build(), batch_size=rows)
    monkeypatch.setattr("rlhf_lightning.rollout.logprobs.trim_padding", spy)
    monkeypatch.setattr("rlhf_lightning.modules.ppo.trim_padding", spy)
    budgeted = _fit(build(max_tokens_per_micro_batch=64 if cls == "grpo" else 160), batch_size=rows)
    assert any(trimmed < full for full, trimmed in widths), widths  # ragged rows: short micro-batches ran narrower
    for (name, p), q in zip(padded.policy.named_parameters(), budgeted.policy.parameters()):
        assert torch.allclose(p, q, atol=1e-5), name


# ------------------------------------------------------------------------------------ shared prompt prefix
def _grouped_batch(G=3):
    """The ragged batch's 4 prompts, each repeated G times (rows i*G .. i*G+G-1), with G different completions."""
    p_ids, p_mask, c_ids, c_mask = _ragged_batch()
    g = torch.Generator().manual_seed(1)
    c_ids = torch.randint(3, 90, (4 * G, c_ids.size(1)), generator=g)
    lengths = torch.randint(1, c_ids.size(1) + 1, (4 * G,), generator=g)
    c_mask = (torch.arange(c_ids.size(1))[None] < lengths[:, None]).long()
    return p_ids.repeat_interleave(G, 0), p_mask.repeat_interleave(G, 0), c_ids * c_mask, c_mask


@pytest.mark.parametrize("kind", ["tiny", "qwen2"])
def test_shared_prompt_forward_gives_the_one_pass_logprobs_and_gradients(kind, monkeypatch):
    """Each distinct prompt runs once (4 prompt rows for 12 completions), its KV cache read by the rows that
    repeat it: the same log-probs and gradients as one forward of prompt + completion per row."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from rlhf_lightning.rollout import logprobs

    torch.manual_seed(0)
    if kind == "tiny":
        model = load_causal_lm("tiny", build_char_tokenizer(), seed=0)
    else:  # q/k/v biases and GQA
        model = Qwen2ForCausalLM(Qwen2Config(vocab_size=96, hidden_size=64, intermediate_size=128,
                                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.k_proj.bias.normal_(0, 0.5)
    batch = _grouped_batch()
    calls = []
    forward = model.forward
    monkeypatch.setattr(model, "forward", lambda **kw: calls.append(kw["input_ids"].shape) or forward(**kw))
    results = {}
    for share in (False, True):
        model.zero_grad()
        calls.clear()
        logp, entropy = completion_logprobs(model, *batch, temperature=0.7, return_entropy=True, share_prompts=share)
        (logp.sum() + entropy.sum()).backward()
        results[share] = logp.detach(), entropy.detach(), [p.grad.clone() for p in model.parameters()], list(calls)
    (ref, ref_h, ref_g, one_pass), (got, got_h, got_g, shared) = results[False], results[True]
    assert len(one_pass) == 1 and one_pass[0][0] == 12
    assert [tuple(s) for s in shared] == [(4, 5), (12, batch[2].size(1))]  # 4 prompts once, then 12 completions
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(got_h, ref_h, atol=1e-5, rtol=0)
    for (name, _), a, b in zip(model.named_parameters(), got_g, ref_g):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=name)
    assert logprobs.shared_prompt_logits(model, *_ragged_batch()) is None  # all prompts distinct: one pass


def test_grpo_trains_the_same_with_and_without_shared_prompts():
    """A seeded GRPO run (old, reference and training passes) with share_prompt_prefix on and off: weights equal
    to float rounding."""
    def build(**kw):
        return GRPOModule("tiny", group_size=4, beta=0.04, num_iterations=2, max_new_tokens=12, temperature=1.5,
                          lr=1e-3, seed=0, **kw)

    one_pass = _fit(build(share_prompt_prefix=False))
    shared = _fit(build())
    for (name, p), q in zip(one_pass.policy.named_parameters(), shared.policy.parameters()):
        assert torch.allclose(p, q, atol=1e-5), name
