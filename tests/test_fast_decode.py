"""The fast decode engine (rlhf_lightning.rollout.fast) against the HF engine of `rollout.sample`.

Random-weight models built from configs: the `tiny` Llama preset (GQA), a Qwen2 with q/k/v biases and GQA, a
Mistral, and Llama variants (dynamic rope, linear rope, biases everywhere). Prompts are left-padded to different
lengths, so padding, per-row positions and the key mask are all exercised.
"""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

from rlhf_lightning.models import load_causal_lm
from rlhf_lightning.rollout import get_engine, sample
from rlhf_lightning.rollout.fast import FastDecoder, ineligibility_reason
from rlhf_lightning.rollout.hf import HFDecoder as _HFDecoder

PAD = 0
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16, 17], [18]]
SMALL = dict(vocab_size=48, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=64, max_position_embeddings=64)


def _decoder(engine: str, model: torch.nn.Module, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
             max_new_tokens: int, static_cache: bool = True):
    """The decoder the decoder engine `engine` would run on this batch (which one `auto` picks)."""
    return get_engine(engine)(model, static_cache=static_cache).decoder(prompt_ids, prompt_mask, max_new_tokens)


def left_pad(prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    P = max(len(p) for p in prompts)
    ids = torch.tensor([[PAD] * (P - len(p)) + p for p in prompts])  # [B, P]
    mask = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in prompts])  # [B, P]
    return ids, mask


def build(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if kind == "tiny":
        from rlhf_lightning.tokenizer import build_char_tokenizer

        return load_causal_lm("tiny", build_char_tokenizer()).eval()
    if kind == "qwen2":  # q/k/v biases (random, so they matter) and GQA
        m = Qwen2ForCausalLM(Qwen2Config(**SMALL))
        with torch.no_grad():
            for layer in m.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.5)
        return m.eval()
    if kind == "mistral":
        return MistralForCausalLM(MistralConfig(**SMALL, sliding_window=None)).eval()
    if kind == "llama-bias":  # attention_bias + mlp_bias + untied head: every optional bias / weight path
        m = LlamaForCausalLM(LlamaConfig(**SMALL, attention_bias=True, mlp_bias=True, tie_word_embeddings=False))
        with torch.no_grad():
            for p in m.parameters():
                if p.dim() == 1 and not torch.all(p == 1):  # biases (norm weights stay 1)
                    p.normal_(0, 0.3)
        return m.eval()
    rope = {"llama-dynamic-rope": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0},
            "llama-linear-rope": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}}[kind]
    # max_position_embeddings 8 < sequence length: the dynamic rope rescales mid-generation
    cfg = dict(SMALL, max_position_embeddings=8)
    return LlamaForCausalLM(LlamaConfig(**cfg, rope_parameters=rope)).eval()


MODELS = ["tiny", "qwen2", "mistral", "llama-bias", "llama-dynamic-rope", "llama-linear-rope"]


def teacher_forced_logits(decoder, tokens: torch.Tensor) -> torch.Tensor:
    """Logits [T + 1, B, V] of `decoder` after the prompt and after each of the forced tokens [B, T]."""
    out = [decoder.prefill()]
    for t in range(tokens.size(1)):
        out.append(decoder.step(tokens[:, t]))
    return torch.stack(out).float()


@pytest.mark.parametrize("kind", MODELS)
def test_fast_logits_and_greedy_tokens_match_hf(kind: str) -> None:
    m = build(kind)
    ids, mask = left_pad(PROMPTS)
    assert ineligibility_reason(m, ids.size(1) + 10) is None
    kw = dict(max_new_tokens=10, eos_token_id=1, pad_token_id=PAD, do_sample=False)
    hf = sample(m, ids, mask, engine="hf", **kw)
    fast = sample(m, ids, mask, engine="fast", **kw)
    assert torch.equal(fast.completion_ids, hf.completion_ids)
    assert torch.equal(fast.completion_mask, hf.completion_mask)
    assert torch.allclose(fast.logprobs, hf.logprobs, atol=1e-5)
    # Per step, on the same forced tokens (also the dynamic rope's rescaling, which sample's logprobs may not reach)
    forced = torch.randint(3, m.config.vocab_size, (len(PROMPTS), 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = teacher_forced_logits(_HFDecoder(m, ids, mask, 9, static_cache=True), forced)
        got = teacher_forced_logits(FastDecoder(m, ids, mask, 9), forced)
    assert torch.allclose(got, ref, atol=1e-5, rtol=1e-5), (got - ref).abs().max()


@pytest.mark.parametrize("kind", MODELS)
def test_repeated_prompts_are_prefilled_once_with_the_same_logits(kind: str) -> None:
    """GRPO's layout (each prompt repeated G = 3 times): the prefill runs the distinct prompts only, and every
    row's logits, after the prompt and after each forced token, are those of the HF forward over all rows."""
    m = build(kind)
    ids, mask = left_pad(PROMPTS)
    ids, mask = ids.repeat_interleave(3, dim=0), mask.repeat_interleave(3, dim=0)
    forced = torch.randint(3, m.config.vocab_size, (ids.size(0), 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = teacher_forced_logits(_HFDecoder(m, ids, mask, 9, static_cache=True), forced)
        decoder = FastDecoder(m, ids, mask, 9)
        rows = []
        layer = decoder._layer
        decoder._layer = lambda x, *args: rows.append(x.size(0)) or layer(x, *args)
        got = teacher_forced_logits(decoder, forced)
    assert rows[0] == len(PROMPTS) * ids.size(1)  # the prefill's tokens: the distinct prompts', once
    assert torch.allclose(got, ref, atol=1e-5, rtol=1e-5), (got - ref).abs().max()


@pytest.mark.parametrize("kind", ["tiny", "qwen2"])
def test_fast_sampling_is_token_identical_with_a_seeded_generator(kind: str) -> None:
    """temperature, top-k, top-p, min_new_tokens and a mixed-EOS batch: same tokens, masks, truncation flags."""
    m = build(kind)
    ids, mask = left_pad(PROMPTS * 4)  # 16 rows
    greedy = sample(m, ids, mask, max_new_tokens=12, eos_token_id=1, pad_token_id=PAD, do_sample=False)
    eos = int(greedy.completion_ids[0, 4])  # an EOS some rows emit mid-way and others never
    runs = {}
    for engine in ("hf", "fast"):
        gen = torch.Generator().manual_seed(7)
        runs[engine] = sample(m, ids, mask, max_new_tokens=12, min_new_tokens=2, eos_token_id=eos, pad_token_id=PAD,
                              temperature=0.9, top_k=20, top_p=0.95, generator=gen, engine=engine)
    hf, fast = runs["hf"], runs["fast"]
    assert hf.is_truncated.any() and not hf.is_truncated.all()
    assert torch.equal(fast.completion_ids, hf.completion_ids)
    assert torch.equal(fast.completion_mask, hf.completion_mask)
    assert torch.equal(fast.is_truncated, hf.is_truncated)
    assert torch.allclose(fast.logprobs, hf.logprobs, atol=1e-5)


def test_auto_picks_fast_where_eligible_and_restores_train_mode() -> None:
    """A model in train mode with attention dropout is eligible: sample() decodes in eval mode, where HF applies
    no dropout either, and the mode is restored afterwards."""
    torch.manual_seed(0)
    m = LlamaForCausalLM(LlamaConfig(**SMALL, attention_dropout=0.5)).train()
    ids, mask = left_pad(PROMPTS)
    assert isinstance(_decoder("auto", m, ids, mask, 4, True), FastDecoder)
    assert isinstance(_decoder("hf", m, ids, mask, 4, True), _HFDecoder)
    kw = dict(max_new_tokens=6, eos_token_id=1, pad_token_id=PAD, generator=None, do_sample=False)
    fast, hf = sample(m, ids, mask, **kw), sample(m, ids, mask, engine="hf", **kw)
    assert m.training
    assert torch.equal(fast.completion_ids, hf.completion_ids)
    assert torch.allclose(fast.logprobs, hf.logprobs, atol=1e-5)


def test_lora_model_falls_back_to_hf_and_fast_raises() -> None:
    from peft import LoraConfig, get_peft_model

    m = get_peft_model(build("tiny"), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    ids, mask = left_pad(PROMPTS)
    assert isinstance(_decoder("auto", m, ids, mask, 4, True), _HFDecoder)
    r = sample(m, ids, mask, max_new_tokens=4, eos_token_id=1, pad_token_id=PAD, do_sample=False)
    assert r.completion_ids.shape == (len(PROMPTS), 4)
    with pytest.raises(ValueError, match=r"engine='fast' cannot decode this model: PeftModel.* peft wrapper") as err:
        sample(m, ids, mask, max_new_tokens=4, eos_token_id=1, pad_token_id=PAD, engine="fast")
    assert "\n" not in str(err.value)
    # peft layers injected into the bare model (no wrapper) are caught by the layout check
    inner = m.get_base_model()
    assert "q/k/v/o projections" in ineligibility_reason(inner, 20)


def test_autocast_falls_back_to_hf() -> None:
    m = build("tiny")
    ids, mask = left_pad(PROMPTS)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert isinstance(_decoder("auto", m, ids, mask, 4, True), _HFDecoder)
        r = sample(m, ids, mask, max_new_tokens=4, eos_token_id=1, pad_token_id=PAD, do_sample=False)
        assert r.completion_ids.shape[0] == len(PROMPTS)
        with pytest.raises(ValueError, match="autocast"):
            sample(m, ids, mask, max_new_tokens=4, eos_token_id=1, pad_token_id=PAD, engine="fast")
    assert ineligibility_reason(m, 20) is None  # eligible again outside autocast


def _with_hook(m: torch.nn.Module) -> torch.nn.Module:
    m.model.layers[0].mlp.register_forward_hook(lambda mod, args, out: None)
    return m


@pytest.mark.parametrize(
    "make, culprit",
    [
        (lambda: _with_hook(build("tiny")), "model.layers.0.mlp' has forward hooks"),
        (lambda: Qwen2ForCausalLM(Qwen2Config(**SMALL, use_sliding_window=True, sliding_window=4,
                                              max_window_layers=0)), "sliding_window=4"),
        (lambda: MistralForCausalLM(MistralConfig(**SMALL, sliding_window=4)), "sliding_window=4"),
        (lambda: LlamaForCausalLM(LlamaConfig(**SMALL, hidden_act="gelu")), "hidden_act is 'gelu'"),
        (lambda: _int_params(build("tiny")), "float dtype"),
        (lambda: _gpt2(), "GPT2LMHeadModel is not one of the supported architectures"),
    ],
)
def test_fast_engine_refuses_what_it_cannot_do_exactly(make, culprit: str) -> None:
    m = make().eval()
    ids, mask = left_pad(PROMPTS)
    with pytest.raises(ValueError, match=f"engine='fast' cannot decode this model: .*{culprit}") as err:
        sample(m, ids, mask, max_new_tokens=4, eos_token_id=1, pad_token_id=PAD, engine="fast")
    assert "\n" not in str(err.value)
    assert isinstance(_decoder("auto", m, ids, mask, 4, True), _HFDecoder)


def _int_params(m: torch.nn.Module) -> torch.nn.Module:
    """A model with one non-float parameter (as quantized checkpoints have)."""
    m.model.norm.register_parameter("scale_q", torch.nn.Parameter(torch.ones(2, dtype=torch.int8), requires_grad=False))
    return m


def _gpt2() -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=48, n_positions=64, n_embd=32, n_layer=2, n_head=4))


def test_sliding_window_longer_than_the_sequence_is_eligible() -> None:
    m = MistralForCausalLM(MistralConfig(**SMALL, sliding_window=32)).eval()
    assert ineligibility_reason(m, 32) is None
    assert "sliding_window=32" in ineligibility_reason(m, 33)


def test_unknown_engine_is_rejected() -> None:
    ids, mask = left_pad(PROMPTS)
    with pytest.raises(ValueError, match=r"engine must be auto\|hf\|fast, got 'vllm'"):
        sample(build("tiny"), ids, mask, max_new_tokens=2, eos_token_id=1, pad_token_id=PAD, engine="vllm")


def test_bf16_model_decodes_in_bf16_close_to_hf() -> None:
    m = build("tiny").to(torch.bfloat16)
    ids, mask = left_pad(PROMPTS)
    dec = FastDecoder(m, ids, mask, 6)
    assert dec.layers[0].k_cache.dtype == torch.bfloat16
    forced = torch.randint(3, m.config.vocab_size, (len(PROMPTS), 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = teacher_forced_logits(dec, forced)
        ref = teacher_forced_logits(_HFDecoder(m, ids, mask, 6, static_cache=True), forced)
    # bf16 keeps ~3 significant digits; logits here are O(1)
    assert torch.allclose(got, ref, atol=3e-2), (got - ref).abs().max()
    r = sample(m, ids, mask, max_new_tokens=6, eos_token_id=1, pad_token_id=PAD, engine="fast",
               generator=torch.Generator().manual_seed(0))
    assert r.logprobs.dtype == torch.float32 and r.logprobs.isfinite().all() and (r.logprobs <= 0).all()


@pytest.mark.parametrize("kind", ["tiny", "qwen2", "llama-bias", "llama-dynamic-rope"])
def test_compaction_drops_finished_rows_and_keeps_the_sampled_tokens(kind: str, monkeypatch) -> None:
    """Rows that finished leave the fast decoder's batch (its steps get fewer rows), and a seeded run samples the
    same tokens as the hf engine, which never compacts (a dynamic rope is rescaled by the batch's largest
    position, so there the fast decoder keeps every row)."""
    m = build(kind)
    ids, mask = left_pad(PROMPTS * 4)  # 16 rows
    greedy = sample(m, ids, mask, max_new_tokens=12, eos_token_id=1, pad_token_id=PAD, do_sample=False)
    eos = int(greedy.completion_ids[0, 0])
    rows_per_step = []
    step = FastDecoder.step
    monkeypatch.setattr(FastDecoder, "step", lambda self, token: (rows_per_step.append(token.numel()),
                                                                  step(self, token))[1])
    runs = {}
    for engine in ("hf", "fast"):
        runs[engine] = sample(m, ids, mask, max_new_tokens=24, eos_token_id=eos, pad_token_id=PAD, temperature=1.0,
                              generator=torch.Generator().manual_seed(3), engine=engine)
    hf, fast = runs["hf"], runs["fast"]
    assert hf.is_truncated.any() and not hf.is_truncated.all()  # ragged: some rows end early
    assert torch.equal(fast.completion_ids, hf.completion_ids)
    assert torch.equal(fast.completion_mask, hf.completion_mask)
    assert torch.allclose(fast.logprobs, hf.logprobs, atol=1e-5)
    assert rows_per_step == sorted(rows_per_step, reverse=True)
    if kind == "llama-dynamic-rope":
        assert set(rows_per_step) == {16}
    else:
        assert rows_per_step[0] == 16 and rows_per_step[-1] < 16  # finished rows left the batch
        still_writing = hf.completion_mask[:, 1:len(rows_per_step) + 1].sum(0).tolist()  # rows fed at each step
        assert all(n >= live for n, live in zip(rows_per_step, still_writing))
