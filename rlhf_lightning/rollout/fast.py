"""The `fast` engine's decoder: a lean forward for the standard HF Llama-family layout (`rollout.sample`).

Why: on small models a decode step pays a lot of per-op overhead on top of its matmuls. HF's `LlamaForCausalLM`
forward with a `StaticCache` runs well over a hundred small ops per token (mask building, cache bookkeeping,
separate q/k/v projections, rotary per layer, output capturing). `FastDecoder` reads the same weights and runs the
same math as a flat function: per `sample` call it packs the weights once (pre-transposed, q/k/v fused into one
matrix), preallocates a KV cache of P + max_new_tokens positions per layer that each step writes in place,
attends with `F.scaled_dot_product_attention` against the written prefix of that cache under a boolean key mask,
and computes logits for the last position only. The rotary tables come from the model's own `rotary_emb`, so every
rope type transformers implements (scaling included) is computed by transformers.

It is used only where it is exact (`ineligibility_reason` returns None): the exact HF classes below with the
exact module layout it was verified on, no hooks or forward overrides it would bypass, no peft/LoRA layers
(they replace the `nn.Linear` projections), no DTensor (FSDP2) parameters, no autocast, one float dtype, SiLU MLP,
and no sliding window that could cut a sequence of this length. Anything else keeps the HF path.

It pays most where per-op overhead dominates (small models: matmuls are under half of its time there), less where
the matmuls do (`medium`). Design choices, each decided by a measurement: weights pre-transposed for `x @ W_t`
(faster than `F.linear`'s transposed operand); gate/up kept as two matmuls (a fused matrix overflows the L2);
q/k/v fused (one op instead of three); `F.rms_norm` (one fused op, bit-identical in fp32); no `torch.compile` of
the per-token step (it did not win, with static or dynamic shapes). The timings, shapes and profiles are in
docs/performance.md ("The `fast` decode engine").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import distinct_prompts, position_ids_from_mask

# model class -> the module classes of its layout, all from the same transformers file.
_FAMILIES = {
    "LlamaForCausalLM": "transformers.models.llama.modeling_llama",
    "Qwen2ForCausalLM": "transformers.models.qwen2.modeling_qwen2",
    "MistralForCausalLM": "transformers.models.mistral.modeling_mistral",
}

# rope types whose tables depend on the sequence seen so far (transformers' `dynamic_rope_update`): their tables
# are computed step by step exactly as the HF loop computes them, the others once per `sample` call.
_STATEFUL_ROPE = ("dynamic", "longrope")

_ATTN_IMPLEMENTATIONS = (None, "eager", "sdpa")


def _family_classes(model: nn.Module) -> dict[str, type] | None:
    """The expected module classes for `model`'s architecture, or None if it is not a supported one."""
    import importlib

    name = type(model).__name__
    module_name = _FAMILIES.get(name)
    if module_name is None:
        return None
    mod = importlib.import_module(module_name)
    prefix = name[: -len("ForCausalLM")]
    classes = {part: getattr(mod, prefix + part, None)
               for part in ("ForCausalLM", "Model", "DecoderLayer", "Attention", "MLP", "RMSNorm", "RotaryEmbedding")}
    if any(c is None for c in classes.values()) or type(model) is not classes["ForCausalLM"]:
        return None  # a subclass (or a same-named class from elsewhere) may change the forward
    return classes


def _hooks_reason(model: nn.Module) -> str | None:
    """Why forward hooks / overrides would be bypassed, or None."""
    from torch.nn.modules import module as module_mod

    if module_mod._global_forward_hooks or module_mod._global_forward_pre_hooks:
        return "global forward hooks are registered (the fast engine would bypass them)"
    for name, m in model.named_modules():
        if m._forward_hooks or m._forward_pre_hooks:
            return f"module {name or type(m).__name__!r} has forward hooks (the fast engine would bypass them)"
        if "forward" in vars(m):
            return f"module {name or type(m).__name__!r} has its forward replaced (e.g. accelerate offloading)"
    return None


def _params_reason(model: nn.Module) -> str | None:
    """Why the parameters cannot be read as plain dense tensors of one float dtype on one device, or None."""
    dtypes, devices = set(), set()
    for name, p in model.named_parameters():
        if type(p.data) is not torch.Tensor:  # DTensor (FSDP2), quantized or other tensor subclasses
            return f"parameter {name!r} is a {type(p.data).__name__}, not a plain tensor (sharded/quantized)"
        dtypes.add(p.dtype)
        devices.add(p.device)
    if len(dtypes) != 1 or not next(iter(dtypes)).is_floating_point:
        return f"parameters must share one float dtype, got {sorted(str(d) for d in dtypes)}"
    if len(devices) != 1:
        return f"parameters are spread over devices {sorted(str(d) for d in devices)}"
    device = next(iter(devices))
    if device.type == "meta":
        return "parameters are on the meta device"
    if torch.is_autocast_enabled(device.type):
        return f"autocast is enabled on {device.type} (the HF path follows its per-op dtype rules)"
    return None


def _linear_ok(m: object, n_in: int, n_out: int) -> bool:
    return type(m) is nn.Linear and m.in_features == n_in and m.out_features == n_out


def _layout_reason(model: nn.Module, classes: dict[str, type], max_len: int) -> str | None:
    """Why the module tree / config is not the verified Llama-family layout, or None."""
    cfg = model.config
    inner = getattr(model, "model", None)
    if type(inner) is not classes["Model"]:
        return f"model.model is {type(inner).__name__}, expected {classes['Model'].__name__}"
    if getattr(cfg, "hidden_act", None) != "silu":
        return f"config.hidden_act is {getattr(cfg, 'hidden_act', None)!r}, only 'silu' is supported"
    attn_impl = getattr(cfg, "_attn_implementation", None)
    if attn_impl not in _ATTN_IMPLEMENTATIONS:
        return f"attention implementation {attn_impl!r} is not one of {_ATTN_IMPLEMENTATIONS[1:]}"
    if getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "attn_logit_softcapping", None):
        return "logit softcapping is not supported"
    window = getattr(cfg, "sliding_window", None)
    if classes["ForCausalLM"].__name__ == "MistralForCausalLM" and window is not None and window < max_len:
        return f"sliding_window={window} is active for {max_len} positions"
    H = cfg.hidden_size
    n_heads, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    if type(inner.embed_tokens) is not nn.Embedding or inner.embed_tokens.embedding_dim != H:
        return "model.model.embed_tokens is not an nn.Embedding of hidden_size"
    if type(inner.norm) is not classes["RMSNorm"] or type(inner.rotary_emb) is not classes["RotaryEmbedding"]:
        return "model.model.norm / rotary_emb are not the architecture's own modules"
    if not isinstance(inner.rotary_emb.rope_type, str):
        return f"per-layer rope types {inner.rotary_emb.rope_type!r} are not supported"
    if not _linear_ok(model.lm_head, H, cfg.vocab_size):
        return "lm_head is not an nn.Linear(hidden_size, vocab_size) (peft/LoRA or a custom head)"
    if type(inner.layers) is not nn.ModuleList or len(inner.layers) != cfg.num_hidden_layers:
        return "model.model.layers is not a ModuleList of num_hidden_layers layers"
    for i, layer in enumerate(inner.layers):
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        if type(layer) is not classes["DecoderLayer"] or type(attn) is not classes["Attention"] \
                or type(mlp) is not classes["MLP"]:
            return f"layer {i} is not the architecture's own DecoderLayer/Attention/MLP"
        if type(layer.input_layernorm) is not classes["RMSNorm"] \
                or type(layer.post_attention_layernorm) is not classes["RMSNorm"]:
            return f"layer {i} norms are not the architecture's RMSNorm"
        D = attn.head_dim
        if not (_linear_ok(attn.q_proj, H, n_heads * D) and _linear_ok(attn.k_proj, H, n_kv * D)
                and _linear_ok(attn.v_proj, H, n_kv * D) and _linear_ok(attn.o_proj, n_heads * D, H)):
            return f"layer {i} q/k/v/o projections are not plain nn.Linear of the config's shapes (peft/LoRA?)"
        if (attn.k_proj.bias is None) != (attn.q_proj.bias is None) or \
                (attn.v_proj.bias is None) != (attn.q_proj.bias is None):
            return f"layer {i} has biases on some of q/k/v only"
        inter = mlp.gate_proj.out_features if type(mlp.gate_proj) is nn.Linear else -1
        if not (_linear_ok(mlp.gate_proj, H, inter) and _linear_ok(mlp.up_proj, H, inter)
                and _linear_ok(mlp.down_proj, inter, H)):
            return f"layer {i} gate/up/down projections are not plain nn.Linear (peft/LoRA?)"
        if (mlp.up_proj.bias is None) != (mlp.gate_proj.bias is None):
            return f"layer {i} has a bias on one of gate/up only"
        layer_window = getattr(attn, "sliding_window", None)  # Qwen2's per-layer window
        if layer_window is not None and layer_window < max_len:
            return f"layer {i} has sliding_window={layer_window}, active for {max_len} positions"
    return None


def ineligibility_reason(model: nn.Module, max_len: int) -> str | None:
    """Why `FastDecoder` cannot decode `model` exactly for sequences of `max_len` positions; None if it can."""
    if type(model).__module__.split(".")[0] == "peft":
        return f"{type(model).__name__} is a peft wrapper (its LoRA layers are not plain nn.Linear)"
    classes = _family_classes(model)
    if classes is None:
        return f"{type(model).__name__} is not one of the supported architectures ({', '.join(_FAMILIES)})"
    for check in (lambda: _params_reason(model), lambda: _hooks_reason(model),
                  lambda: _layout_reason(model, classes, max_len)):
        reason = check()
        if reason is not None:
            return reason
    return None


def _rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """HF's LlamaRMSNorm: normalise in float32, cast back, then scale (the same order, so bf16 rounds the same)."""
    if x.dtype == torch.float32:
        return F.rms_norm(x, weight.shape, weight, eps)  # one fused op; same math as below in fp32
    normed = F.rms_norm(x.float(), weight.shape, None, eps)
    return weight * normed.to(x.dtype)


@dataclass
class _Layer:
    """One decoder layer: norms, projections as (weight [in, out], bias) pairs from `_packed`, KV cache."""

    ln1: Tensor
    eps1: float
    qkv: tuple[Tensor, Tensor | None]  # q, k, v side by side: [hidden, (Hq + 2 H_kv) D]
    o: tuple[Tensor, Tensor | None]
    ln2: Tensor
    eps2: float
    gate: tuple[Tensor, Tensor | None]
    up: tuple[Tensor, Tensor | None]
    down: tuple[Tensor, Tensor | None]
    k_cache: Tensor  # [B, H_kv, L, D]
    v_cache: Tensor  # [B, H_kv, L, D]


def _packed(*linears: nn.Linear) -> tuple[Tensor, Tensor | None]:
    """The weights of `linears` side by side as one [in, sum(out)] matrix, and their biases.

    On CPU the matrix is transposed into a contiguous copy once here, because `x @ W_t` with a contiguous [in, out]
    matrix ran faster than `F.linear(x, W)` (BLAS with a transposed operand) for every projection shape of the
    presets (docs/performance.md). Elsewhere (GPU BLAS transposes for free) it stays a view, so a single
    projection costs no copy of its weight; only the q/k/v concatenation copies.
    """
    weight = linears[0].weight if len(linears) == 1 else torch.cat([m.weight for m in linears], dim=0)
    weight_t = weight.t()
    if weight.device.type == "cpu":
        weight_t = weight_t.contiguous()
    bias = None if linears[0].bias is None else torch.cat([m.bias for m in linears], dim=0)
    return weight_t, bias


def _linear(x: Tensor, weight_t: Tensor, bias: Tensor | None) -> Tensor:
    """x [N, in] @ weight_t [in, out] (+ bias) -> [N, out]"""
    return torch.mm(x, weight_t) if bias is None else torch.addmm(bias, x, weight_t)


def _residual_linear(residual: Tensor, x: Tensor, weight_t: Tensor, bias: Tensor | None) -> Tensor:
    """residual + x @ weight_t (+ bias): one `addmm` (the residual as its accumulator) where there is no bias."""
    if bias is None:
        return torch.addmm(residual, x, weight_t)
    return residual + torch.addmm(bias, x, weight_t)


class FastDecoder:
    """Functional prefill + one-token decode steps over packed weights and an in-place KV cache.

    Same interface as `hf.HFDecoder`: `prefill()` then `step(token)` repeatedly, each returning the
    next-token logits [B, V] in the model's dtype. Build it only after `ineligibility_reason(...)` returned None.
    `compaction` / `share_prefill` (class attributes, for a subclass or a measurement to turn off): finished rows
    leave the batch (`compact`); rows that repeat a prompt are prefilled once (`prefill`).
    """

    compaction = True
    share_prefill = True

    @torch.no_grad()
    def __init__(self, model: nn.Module, prompt_ids: Tensor, prompt_mask: Tensor, max_new_tokens: int) -> None:
        cfg = model.config
        inner = model.model
        B, P = prompt_ids.shape
        L = P + max_new_tokens
        emb = inner.embed_tokens.weight
        self.dtype, self.device = emb.dtype, emb.device
        self.n_heads, self.n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
        attn0 = inner.layers[0].self_attn
        self.head_dim, self.scale = attn0.head_dim, attn0.scaling
        self.embed = emb
        self.final_norm, self.final_eps = inner.norm.weight, inner.norm.variance_epsilon
        self.head = _packed(model.lm_head)
        D = self.head_dim
        self.layers = []
        for layer in inner.layers:
            a, m = layer.self_attn, layer.mlp
            # q/k/v fused into one matmul; gate and up stay two: fused, their [hidden, 2 I] matrix ran slower than
            # the two halves (545 vs 2 x 197 us for 256 x 2048 at 64 rows: it no longer fits the 2 MB L2 cache).
            self.layers.append(_Layer(
                ln1=layer.input_layernorm.weight, eps1=layer.input_layernorm.variance_epsilon,
                qkv=_packed(a.q_proj, a.k_proj, a.v_proj), o=_packed(a.o_proj),
                ln2=layer.post_attention_layernorm.weight, eps2=layer.post_attention_layernorm.variance_epsilon,
                gate=_packed(m.gate_proj), up=_packed(m.up_proj), down=_packed(m.down_proj),
                k_cache=torch.zeros(B, self.n_kv, L, D, dtype=self.dtype, device=self.device),
                v_cache=torch.zeros(B, self.n_kv, L, D, dtype=self.dtype, device=self.device),
            ))

        self.prompt_ids = prompt_ids.to(self.device)
        self.P, self.t = P, 0  # next cache column to write: P + t
        # key_mask[b, j]: cache column j holds a real token of row b (prompt tokens now, each decoded column later)
        self.key_mask = torch.zeros(B, L, dtype=torch.bool, device=self.device)
        self.key_mask[:, :P] = prompt_mask.to(self.device).bool()
        prompt_pos = position_ids_from_mask(prompt_mask.to(self.device))  # [B, P]
        decode_pos = prompt_pos[:, -1:] + torch.arange(1, max_new_tokens + 1, device=self.device)  # [B, T]
        self.rotary = inner.rotary_emb
        self.stateful_rope = any(k in self.rotary.rope_type for k in _STATEFUL_ROPE)
        self.positions = torch.cat([prompt_pos, decode_pos], dim=1)  # [B, L]
        # finished rows may leave the batch (`compact`), except under a stateful (dynamic) rope: HF rescales it by
        # the largest position in the batch, which would change when rows leave
        self.compactable = self.compaction and not self.stateful_rope
        if not self.stateful_rope:
            # One table for every position of this call: the same elementwise math as per-step calls.
            cos, sin = self.rotary(emb[:1], self.positions)  # [B, L, D] each
            self.cos, self.sin_signed = self._rope_tables(cos, sin)

    @staticmethod
    def _rope_tables(cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
        """cos [B, S, 1, D] and sin with its first half negated, so rotate_half(x) * sin == flip-halves(x) * sin'.

        rotate_half(x) = cat(-x2, x1); multiplying by sin gives cat(-x2 * s1, x1 * s2) = cat(x2 * -s1, x1 * s2):
        the halves of x swapped, times sin with a negated first half. Bit-identical (negation is exact) and two
        ops instead of five per layer.
        """
        half = sin.size(-1) // 2
        sin_signed = torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)
        return cos[:, :, None, :], sin_signed[:, :, None, :]

    def _rope_at(self, start: int, stop: int) -> tuple[Tensor, Tensor]:
        if self.stateful_rope:  # the HF loop's exact call sequence: the prompt, then one position per step
            cos, sin = self.rotary(self.embed[:1], self.positions[:, start:stop])
            return self._rope_tables(cos, sin)
        return self.cos[:, start:stop], self.sin_signed[:, start:stop]

    def _layer(self, x: Tensor, lw: _Layer, cos: Tensor, sin: Tensor, start: int, mask: Tensor) -> Tensor:
        """One decoder layer on x [B * S, hidden] (rows b * S + s) whose tokens go to cache columns start.."""
        Hq, Hkv, D = self.n_heads, self.n_kv, self.head_dim
        B = lw.k_cache.size(0)
        S = x.size(0) // B
        h = _rms_norm(x, lw.ln1, lw.eps1)
        qkv = _linear(h, *lw.qkv)  # [B S, (Hq + 2 Hkv) D]
        qk = qkv[:, : (Hq + Hkv) * D].view(B, S, Hq + Hkv, D)  # q and k heads rotate together
        qk = qk * cos + qk.view(B, S, Hq + Hkv, 2, D // 2).flip(-2).view(B, S, Hq + Hkv, D) * sin
        v = qkv[:, (Hq + Hkv) * D :].view(B, S, Hkv, D)
        stop = start + S
        lw.k_cache[:, :, start:stop] = qk[:, :, Hq:].transpose(1, 2)
        lw.v_cache[:, :, start:stop] = v.transpose(1, 2)
        out = F.scaled_dot_product_attention(
            qk[:, :, :Hq].transpose(1, 2),  # [B, Hq, S, D]
            lw.k_cache[:, :, :stop], lw.v_cache[:, :, :stop],  # the written prefix [B, Hkv, stop, D]
            attn_mask=mask, scale=self.scale, enable_gqa=Hq != Hkv,
        )  # [B, Hq, S, D]
        x = _residual_linear(x, out.transpose(1, 2).reshape(B * S, Hq * D), *lw.o)
        h = _rms_norm(x, lw.ln2, lw.eps2)
        act = F.silu(_linear(h, *lw.gate)) * _linear(h, *lw.up)
        return _residual_linear(x, act, *lw.down)

    def _logits(self, x: Tensor) -> Tensor:
        """Next-token logits [B, V] from the last position's hidden state x [B, hidden]."""
        return _linear(_rms_norm(x, self.final_norm, self.final_eps), *self.head)

    @torch.no_grad()
    def prefill(self) -> Tensor:
        """Run the left-padded prompt through every layer, fill the cache, return logits [B, V].

        Rows that repeat a prompt (GRPO's G samples of each) share one pass: only the U distinct rows run, into a
        [U, ..., P] cache, whose columns and logits are then copied to every row that repeats them."""
        P = self.P
        shared = distinct_prompts(self.prompt_ids, self.key_mask[:, :P]) if self.share_prefill else None
        first, inverse = shared if shared is not None else (None, None)  # [U], [B]
        pick = (lambda t: t) if first is None else (lambda t: t.index_select(0, first))
        key_mask = pick(self.key_mask[:, :P])  # [U, P]
        causal = torch.ones(P, P, dtype=torch.bool, device=self.device).tril()  # [P, P]
        # A pad query sees no real key. torch 2.13's SDPA returns 0 for such a row, but other backends and versions
        # give NaN, and a NaN in a masked-out cache column still poisons the real rows' output (0 * NaN, checked).
        # Letting a pad query see itself keeps its (never used) output finite everywhere.
        mask = (causal & key_mask[:, None, None, :]) | torch.eye(P, dtype=torch.bool, device=self.device)
        cos, sin = (pick(t) for t in self._rope_at(0, P))
        full = [(lw.k_cache, lw.v_cache) for lw in self.layers]
        if first is not None:  # the distinct rows' own cache, only as long as the prompt
            for lw in self.layers:
                lw.k_cache, lw.v_cache = (c.new_zeros(first.size(0), c.size(1), P, c.size(3)) for c in (lw.k_cache, lw.v_cache))
        x = F.embedding(pick(self.prompt_ids).reshape(-1), self.embed)  # [U P, hidden]
        for lw in self.layers:
            x = self._layer(x, lw, cos, sin, 0, mask)
        logits = self._logits(x.view(-1, P, x.size(-1))[:, -1])  # [U, V]
        if first is None:
            return logits
        for lw, (k, v) in zip(self.layers, full):  # every row gets its prompt's columns
            k[:, :, :P], v[:, :, :P] = lw.k_cache.index_select(0, inverse), lw.v_cache.index_select(0, inverse)
            lw.k_cache, lw.v_cache = k, v
        return logits.index_select(0, inverse)  # [B, V]

    @torch.no_grad()
    def compact(self, keep: Tensor) -> None:
        """Keep only rows `keep` [B'] (indices into the current batch): the KV caches, key masks, positions and rope
        tables shrink to them, so later steps compute B' rows. The sampling loop calls it when rows finish."""
        for lw in self.layers:
            lw.k_cache = lw.k_cache.index_select(0, keep)
            lw.v_cache = lw.v_cache.index_select(0, keep)
        self.key_mask = self.key_mask.index_select(0, keep)
        self.positions = self.positions.index_select(0, keep)
        if not self.stateful_rope:
            self.cos, self.sin_signed = self.cos.index_select(0, keep), self.sin_signed.index_select(0, keep)
        self.prompt_ids = self.prompt_ids.index_select(0, keep)

    @torch.no_grad()
    def step(self, token: Tensor) -> Tensor:
        """Feed one token per row [B] at the next cache column; return the following logits [B, V]."""
        col = self.P + self.t
        self.t += 1
        self.key_mask[:, col] = True
        mask = self.key_mask[:, None, None, : col + 1]  # [B, 1, 1, col + 1]
        cos, sin = self._rope_at(col, col + 1)
        x = F.embedding(token, self.embed)  # [B, hidden]
        for lw in self.layers:
            x = self._layer(x, lw, cos, sin, col, mask)
        return self._logits(x)
