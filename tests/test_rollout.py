"""Tests for rlhf_lightning.rollout against transformers (same seed, same tiny random Qwen2)."""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from rlhf_lightning.rollout import (
    RolloutBatch,
    completion_logprobs,
    decode_completions,
    position_ids_from_mask,
    sample,
)
from rlhf_lightning.rollout.sampler import _filter_logits

PAD = 0
PROMPTS = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14, 15], [3]]


def tiny_model(seed: int = 0) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    cfg = Qwen2Config(
        vocab_size=40,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    return Qwen2ForCausalLM(cfg).eval()


def left_pad(prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    P = max(len(p) for p in prompts)
    ids = torch.tensor([[PAD] * (P - len(p)) + p for p in prompts])  # [B, P]
    mask = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in prompts])  # [B, P]
    return ids, mask


@pytest.fixture(scope="module")
def model() -> Qwen2ForCausalLM:
    return tiny_model()


@pytest.fixture(scope="module")
def eos(model: Qwen2ForCausalLM) -> int:
    """An EOS id that the greedy policy emits mid-way in row 0, so rows finish at different steps."""
    ids, mask = left_pad(PROMPTS)
    r = sample(model, ids, mask, max_new_tokens=12, eos_token_id=PAD, pad_token_id=PAD, do_sample=False)
    tok = int(r.completion_ids[0, 3])
    assert tok not in r.completion_ids[0, :3].tolist() and tok != PAD
    return tok


def reference_logprobs(
    model: Qwen2ForCausalLM, prompt: list[int], completion: list[int], temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain unpadded full forward + full log_softmax: logprobs [T] and entropy [T] of `completion`."""
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].float() / temperature  # [L, V]
    logp = torch.log_softmax(logits[len(prompt) - 1 : -1], dim=-1)  # [T, V]
    lp = logp.gather(-1, torch.tensor(completion)[:, None]).squeeze(-1)
    ent = -(logp.exp() * logp).sum(-1)
    return lp, ent


def test_position_ids_from_mask() -> None:
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 1, 1, 0, 1]])
    expected = torch.tensor([[0, 0, 0, 1, 2], [0, 1, 2, 3, 4], [0, 0, 1, 1, 2]])
    assert torch.equal(position_ids_from_mask(mask), expected)


def test_filter_logits_top_k_top_p_hand_computed() -> None:
    probs = torch.tensor([[0.05, 0.5, 0.15, 0.3]])
    logits = probs.log()
    inf = float("-inf")
    # top-k=3 drops the smallest (0.05).
    assert torch.equal(_filter_logits(logits, 3, 1.0).isinf(), torch.tensor([[True, False, False, False]]))
    # top-p=0.7: sorted 0.5, 0.3, 0.15, 0.05 -> mass above = 0, 0.5, 0.8, 0.95 -> keep {0.5, 0.3}.
    out = _filter_logits(logits, 0, 0.7)
    assert out[0, 0] == inf and out[0, 2] == inf
    assert torch.allclose(out[0, [1, 3]], logits[0, [1, 3]])
    # top-p tiny still keeps the top token.
    assert _filter_logits(logits, 0, 1e-6).isfinite().tolist() == [[False, True, False, False]]
    # top-k=3 then top-p=0.9 on the renormalised top-3 (0.5/0.95, 0.3/0.95, 0.15/0.95): mass above 0.15 is
    # 0.842 < 0.9, so all three survive.
    assert _filter_logits(logits, 3, 0.9).isfinite().tolist() == [[False, True, True, True]]


def test_greedy_matches_hf_generate(model: Qwen2ForCausalLM, eos: int) -> None:
    ids, mask = left_pad(PROMPTS)
    r = sample(model, ids, mask, max_new_tokens=12, eos_token_id=eos, pad_token_id=PAD, do_sample=False)
    g = model.generate(
        input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=12, eos_token_id=eos, pad_token_id=PAD
    )
    assert torch.equal(r.completion_ids, g[:, ids.size(1) :])
    # The chosen EOS makes this a mixed batch: some rows finish, at least one is truncated.
    assert r.is_truncated.any() and not r.is_truncated.all()


def test_masks_pad_after_eos_and_truncation(model: Qwen2ForCausalLM, eos: int) -> None:
    ids, mask = left_pad(PROMPTS)
    r = sample(model, ids, mask, max_new_tokens=12, eos_token_id=eos, pad_token_id=PAD, do_sample=False)
    for row, m, trunc, lp in zip(r.completion_ids.tolist(), r.completion_mask.tolist(), r.is_truncated, r.logprobs):
        if eos in row:
            k = row.index(eos)
            assert m == [1] * (k + 1) + [0] * (len(row) - k - 1)
            assert row[k + 1 :] == [PAD] * (len(row) - k - 1)
            assert not trunc
            assert (lp[k + 1 :] == 0).all() and (lp[: k + 1] < 0).all()
        else:
            assert m == [1] * len(row) and trunc
    assert torch.equal(r.completion_lengths(), r.completion_mask.sum(-1))
    assert r.completion_lengths()[0] == 4  # row 0 emits EOS at step 3 by construction of the fixture


def test_sample_logprobs_match_completion_logprobs_and_full_forward(model: Qwen2ForCausalLM, eos: int) -> None:
    ids, mask = left_pad(PROMPTS)
    gen = torch.Generator().manual_seed(1)
    r = sample(model, ids, mask, max_new_tokens=10, eos_token_id=eos, pad_token_id=PAD, temperature=0.7, generator=gen)
    lp, ent = completion_logprobs(
        model, ids, mask, r.completion_ids, r.completion_mask, temperature=0.7, return_entropy=True
    )
    assert lp.dtype == torch.float32 and lp.shape == r.completion_ids.shape
    assert torch.allclose(r.logprobs, lp, atol=1e-5)
    for b, prompt in enumerate(PROMPTS):
        n = int(r.completion_mask[b].sum())
        ref_lp, ref_ent = reference_logprobs(model, prompt, r.completion_ids[b, :n].tolist(), temperature=0.7)
        assert torch.allclose(lp[b, :n], ref_lp, atol=1e-5)
        assert torch.allclose(ent[b, :n], ref_ent, atol=1e-5)
        assert (lp[b, n:] == 0).all() and (ent[b, n:] == 0).all()


def test_temperature_scales_logprobs(model: Qwen2ForCausalLM) -> None:
    prompt, completion = [5, 6, 7], [8, 9, 10]
    ids, mask = left_pad([prompt])
    c_ids, c_mask = torch.tensor([completion]), torch.ones(1, 3, dtype=torch.long)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt + completion])).logits[0, 2:5]  # [3, V]
    for temp in (0.5, 1.0, 2.0):
        expected = torch.log_softmax(logits / temp, -1).gather(-1, torch.tensor(completion)[:, None]).squeeze(-1)
        got = completion_logprobs(model, ids, mask, c_ids, c_mask, temperature=temp)
        assert torch.allclose(got[0], expected, atol=1e-5)
    hot = completion_logprobs(model, ids, mask, c_ids, c_mask, temperature=2.0)
    cold = completion_logprobs(model, ids, mask, c_ids, c_mask, temperature=0.5)
    assert not torch.allclose(hot, cold, atol=1e-3)
    # sample() reports logprobs under the same scaled policy (greedy tokens, temperature 2).
    r = sample(model, ids, mask, max_new_tokens=4, eos_token_id=1, pad_token_id=PAD, temperature=2.0, do_sample=False)
    ref, _ = reference_logprobs(model, prompt, r.completion_ids[0].tolist(), temperature=2.0)
    assert torch.allclose(r.logprobs[0], ref, atol=1e-5)


def test_prompt_alone_equals_prompt_in_padded_batch(model: Qwen2ForCausalLM, eos: int) -> None:
    ids, mask = left_pad(PROMPTS)
    batch = sample(model, ids, mask, max_new_tokens=8, eos_token_id=eos, pad_token_id=PAD, do_sample=False)
    for b, prompt in enumerate(PROMPTS):
        one_ids, one_mask = left_pad([prompt])
        one = sample(model, one_ids, one_mask, max_new_tokens=8, eos_token_id=eos, pad_token_id=PAD, do_sample=False)
        n = one.completion_ids.size(1)  # a lone row stops as soon as it is done
        assert torch.equal(one.completion_ids[0], batch.completion_ids[b, :n])
        assert torch.equal(one.completion_mask[0], batch.completion_mask[b, :n])
        assert (batch.completion_mask[b, n:] == 0).all()
        assert torch.allclose(one.logprobs[0], batch.logprobs[b, :n], atol=1e-5)


def eos_biased_model(eos: int) -> Qwen2ForCausalLM:
    """The tiny model with an lm_head bias of +100 on EOS: unfiltered, it emits EOS with probability ~1."""
    m = tiny_model()
    head = torch.nn.Linear(m.config.hidden_size, m.config.vocab_size, bias=True)
    with torch.no_grad():
        head.weight.copy_(m.lm_head.weight)
        head.bias.zero_()
        head.bias[eos] = 100.0
    m.lm_head = head
    return m


def test_min_new_tokens_forbids_eos_and_logprobs_are_unfiltered() -> None:
    eos = 1
    m = eos_biased_model(eos)
    ids, mask = left_pad(PROMPTS)
    free = sample(m, ids, mask, max_new_tokens=6, eos_token_id=eos, pad_token_id=PAD)
    assert free.completion_ids.tolist() == [[eos]] * 4  # everyone stops at once -> T = 1
    gen = torch.Generator().manual_seed(0)
    r = sample(m, ids, mask, max_new_tokens=6, min_new_tokens=3, eos_token_id=eos, pad_token_id=PAD, generator=gen)
    assert r.completion_ids.size(1) == 4  # 3 forced tokens, then EOS everywhere, then early stop
    assert (r.completion_ids[:, :3] != eos).all() and (r.completion_ids[:, 3] == eos).all()
    assert r.completion_mask.all() and not r.is_truncated.any()
    # Logprobs are those of the unfiltered policy: the forced non-EOS tokens cost ~ -100 nats each.
    assert (r.logprobs[:, :3] < -90).all() and (r.logprobs[:, 3] > -1e-3).all()
    assert torch.allclose(r.logprobs, completion_logprobs(m, ids, mask, r.completion_ids, r.completion_mask), atol=1e-4)
    greedy = sample(
        m, ids, mask, max_new_tokens=6, min_new_tokens=2, eos_token_id=eos, pad_token_id=PAD, do_sample=False
    )
    assert greedy.completion_ids.size(1) == 3 and (greedy.completion_ids[:, 2] == eos).all()


def test_truncated_when_no_eos(model: Qwen2ForCausalLM) -> None:
    eos = 1
    m = eos_biased_model(eos)
    ids, mask = left_pad(PROMPTS)
    r = sample(m, ids, mask, max_new_tokens=3, min_new_tokens=3, eos_token_id=eos, pad_token_id=PAD)
    assert r.completion_ids.shape == (4, 3) and r.is_truncated.all() and r.completion_mask.all()


def test_seeded_generator_reproducible(model: Qwen2ForCausalLM, eos: int) -> None:
    ids, mask = left_pad(PROMPTS)
    kw = dict(max_new_tokens=10, eos_token_id=eos, pad_token_id=PAD, temperature=1.3)
    a = sample(model, ids, mask, generator=torch.Generator().manual_seed(123), **kw)
    b = sample(model, ids, mask, generator=torch.Generator().manual_seed(123), **kw)
    c = sample(model, ids, mask, generator=torch.Generator().manual_seed(124), **kw)
    assert torch.equal(a.completion_ids, b.completion_ids) and torch.equal(a.logprobs, b.logprobs)
    assert not torch.equal(a.completion_ids, c.completion_ids)


def test_top_k_1_and_tiny_top_p_equal_greedy(model: Qwen2ForCausalLM, eos: int) -> None:
    ids, mask = left_pad(PROMPTS)
    kw = dict(max_new_tokens=10, eos_token_id=eos, pad_token_id=PAD)
    greedy = sample(model, ids, mask, do_sample=False, **kw)
    gen = torch.Generator().manual_seed(0)
    k1 = sample(model, ids, mask, top_k=1, generator=gen, **kw)
    p0 = sample(model, ids, mask, top_p=1e-6, generator=gen, **kw)
    t0 = sample(model, ids, mask, temperature=0.0, generator=gen, **kw)
    for r in (k1, p0, t0):
        assert torch.equal(r.completion_ids, greedy.completion_ids)
    assert torch.allclose(k1.logprobs, greedy.logprobs, atol=1e-6)  # same T=1 policy, filters ignored


def test_sampling_frequencies_match_filtered_distribution(model: Qwen2ForCausalLM) -> None:
    """4000 one-token samples of one prompt: frequencies follow softmax(logits / 0.5) renormalised on the top 3."""
    n = 4000
    ids, mask = left_pad([[5, 6, 7]] * n)
    gen = torch.Generator().manual_seed(0)
    kw = dict(max_new_tokens=1, eos_token_id=1, pad_token_id=PAD, temperature=0.5, top_k=3, generator=gen)
    r = sample(model, ids, mask, **kw)
    with torch.no_grad():
        logits = model(input_ids=ids[:1]).logits[0, -1] / 0.5  # [V]
    top = torch.topk(logits, 3)
    expected = torch.softmax(top.values, -1)
    freq = torch.bincount(r.completion_ids[:, 0], minlength=40).float() / n
    assert torch.allclose(freq[top.indices], expected, atol=0.03)
    assert freq[top.indices].sum() == 1.0
    # Reported logprobs are the top-k-free policy: log softmax over the whole vocabulary.
    full = torch.log_softmax(logits, -1)
    assert torch.allclose(r.logprobs[:, 0], full[r.completion_ids[:, 0]], atol=1e-5)


def test_gradient_flows_through_completion_logprobs() -> None:
    m = tiny_model().train()
    ids, mask = left_pad(PROMPTS)
    c_ids = torch.tensor([[4, 5, 1], [6, 1, 0], [7, 8, 9], [1, 0, 0]])
    c_mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 1, 1], [1, 0, 0]])
    lp, ent = completion_logprobs(m, ids, mask, c_ids, c_mask, return_entropy=True)
    assert lp.requires_grad and ent.requires_grad
    (lp.sum() + ent.sum()).backward()
    for p in (m.lm_head.weight, m.model.embed_tokens.weight, m.model.layers[0].self_attn.q_proj.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0 and p.grad.isfinite().all()
    # A masked-out completion position is invisible: changing its token changes no logprob.
    c_ids2 = c_ids.clone()
    c_ids2[1, 2] = 33
    lp2 = completion_logprobs(m, ids, mask, c_ids2, c_mask)
    assert torch.allclose(lp.detach(), lp2.detach(), atol=1e-6)


def test_model_mode_eval_during_sampling_and_restored() -> None:
    m = tiny_model()
    seen: list[bool] = []
    m.register_forward_pre_hook(lambda mod, args: seen.append(mod.training))
    ids, mask = left_pad(PROMPTS)
    for mode in (True, False):
        m.train(mode)
        seen.clear()
        sample(m, ids, mask, max_new_tokens=3, eos_token_id=1, pad_token_id=PAD)
        assert seen and not any(seen)
        assert m.training is mode


class CharStub:
    """A minimal tokenizer: one character per id, '<e>' for EOS and '_' for pad, so leaks are visible."""

    eos_token_id = 1

    def decode(self, ids: list[int]) -> str:
        return "".join({0: "_", 1: "<e>"}.get(i, chr(ord("a") + i - 2)) for i in ids)


def test_decode_completions_strips_eos_and_pad() -> None:
    ids = torch.tensor([[2, 3, 1, 0], [4, 4, 4, 4], [1, 0, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    assert decode_completions(CharStub(), ids, mask) == ["ab", "cccc", ""]


def test_rollout_batch_lengths() -> None:
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    rb = RolloutBatch(torch.zeros(2, 1), torch.ones(2, 1), torch.zeros(2, 3), mask, None, torch.tensor([False, True]))
    assert rb.completion_lengths().tolist() == [2, 3]


@pytest.mark.parametrize(
    "kwargs, culprit",
    [
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(min_new_tokens=5), "min_new_tokens"),
        (dict(min_new_tokens=-1), "min_new_tokens"),
        (dict(temperature=-0.1), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_k=-1), "top_k"),
    ],
)
def test_sample_validates_arguments(model: Qwen2ForCausalLM, kwargs: dict, culprit: str) -> None:
    ids, mask = left_pad(PROMPTS)
    args = dict(max_new_tokens=4, eos_token_id=1, pad_token_id=PAD) | kwargs
    with pytest.raises(ValueError, match=culprit):
        sample(model, ids, mask, **args)


def test_right_padded_prompt_is_rejected(model: Qwen2ForCausalLM) -> None:
    ids = torch.tensor([[5, 6, 0]])
    mask = torch.tensor([[1, 1, 0]])
    with pytest.raises(ValueError, match="left-padded"):
        sample(model, ids, mask, max_new_tokens=2, eos_token_id=1, pad_token_id=PAD)
    with pytest.raises(ValueError, match="temperature"):
        completion_logprobs(model, ids[:, :2], mask[:, :2], ids[:, :2], mask[:, :2], temperature=0.0)
    with pytest.raises(ValueError, match="completion_ids"):
        completion_logprobs(model, ids[:, :2], mask[:, :2], ids[0], mask[0])


def test_absolute_position_model_padded_batch_matches_alone() -> None:
    """GPT-2 has learned absolute positions, so wrong position ids under left padding would show up here
    (with RoPE a constant per-row shift cancels out and the Qwen2 tests cannot see it)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    m = GPT2LMHeadModel(GPT2Config(vocab_size=40, n_positions=64, n_embd=32, n_layer=2, n_head=4)).eval()
    ids, mask = left_pad(PROMPTS)
    batch = sample(m, ids, mask, max_new_tokens=6, eos_token_id=1, pad_token_id=PAD, do_sample=False)
    lp = completion_logprobs(m, ids, mask, batch.completion_ids, batch.completion_mask)
    assert torch.allclose(lp, batch.logprobs, atol=1e-5)
    for b, prompt in enumerate(PROMPTS):
        n = int(batch.completion_mask[b].sum())
        ref, _ = reference_logprobs(m, prompt, batch.completion_ids[b, :n].tolist())
        assert torch.allclose(lp[b, :n], ref, atol=1e-5)


@pytest.mark.parametrize("make", [tiny_model, "gpt2"])
def test_static_and_dynamic_cache_sample_the_same(make, eos: int) -> None:
    """The preallocated cache (default) and the growing one give the same tokens, masks and log-probs, with
    sampling, a mixed-EOS batch and left padding; GPT-2 (absolute positions) takes the same path."""
    if make == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        torch.manual_seed(0)
        m = GPT2LMHeadModel(GPT2Config(vocab_size=40, n_positions=64, n_embd=32, n_layer=2, n_head=4)).eval()
    else:
        m = make()
    ids, mask = left_pad(PROMPTS)
    runs = []
    for static in (True, False):
        gen = torch.Generator().manual_seed(3)
        runs.append(sample(m, ids, mask, max_new_tokens=12, eos_token_id=eos, pad_token_id=PAD, temperature=0.8,
                           generator=gen, static_cache=static, engine="hf"))
    a, b = runs
    assert torch.equal(a.completion_ids, b.completion_ids) and torch.equal(a.completion_mask, b.completion_mask)
    assert torch.allclose(a.logprobs, b.logprobs, atol=1e-5)


def test_static_cache_is_used_only_where_the_model_supports_it(model: Qwen2ForCausalLM) -> None:
    from transformers import StaticCache

    from rlhf_lightning.rollout.hf import _static_cache

    assert isinstance(_static_cache(model, 20), StaticCache)
    assert _static_cache(torch.nn.Linear(2, 2), 20) is None  # not a transformers model: the dynamic cache


def test_sampling_under_autocast_keeps_the_dynamic_cache(model: Qwen2ForCausalLM) -> None:
    """bf16 autocast (Lightning's bf16-mixed) samples without error, through the dynamic cache."""
    from rlhf_lightning.rollout.hf import _static_cache

    ids, mask = left_pad(PROMPTS)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert _static_cache(model, 20) is None
        r = sample(model, ids, mask, max_new_tokens=5, eos_token_id=1, pad_token_id=PAD, do_sample=False)
    assert r.completion_ids.shape[0] == len(PROMPTS) and 1 <= r.completion_ids.shape[1] <= 5
    assert r.completion_mask[:, 0].all()  # every row got at least its first token
