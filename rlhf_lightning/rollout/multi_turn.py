"""Multi-turn rollouts: the policy writes, a tool answers, the policy goes on — with the tool's tokens masked.

`multi_turn_generate` drives any `RolloutEngine` turn by turn:

    turn k:  the ACTIVE rows only (prompt + everything so far, left-padded) -> engine.generate, stopping at EOS
             or at the tool format's end-of-call token (`SamplingParams.stop_token_ids`)
             a row that stopped at a call -> `ToolInteraction.reply` parses and runs it (timeout, never raises) and
             its result text is appended: attended by the policy, `action_mask` 0 (no loss, KL or entropy),
             log-prob 0
             a row that stopped at EOS, hit the token budget or `max_turns` -> finished
    end:     one right-padded completion per row: policy and tool tokens in order, `completion_mask` 1 on all of
             them, `action_mask` 1 on the policy's only; `TurnStats` counts turns / calls / errors per row

`max_new_tokens` is the whole conversation's budget (policy + tool tokens). Each turn re-reads the row's context
(no KV cache kept between turns): simple, exact for every engine, and the prefill is a small share at these sizes.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

from .base import RolloutBatch, RolloutEngine, SamplingParams, TurnStats, left_pad


@dataclass
class Reply:
    """What answers the policy after a turn that ended at a call's end marker: `text` to append."""

    text: str
    error: bool = False
    timed_out: bool = False
    is_call: bool = True  # False: the end marker closed no call (counted as no tool call)


class ToolInteraction:
    """Answers a turn that ended at a tool call with the tool's result (`tools.ToolRunner`, `tools.ToolFormat`)."""

    def __init__(self, runner, fmt, tokenizer) -> None:
        self.runner, self.fmt, self.tokenizer = runner, fmt, tokenizer
        self.stop_token_ids = (fmt.stop_token_id(tokenizer),)

    def reply(self, turn_text: str) -> Reply:
        """The answer to a turn that stopped at the end-of-call token."""
        call = self.fmt.parse(turn_text)
        if call is None:  # the end marker without a call: plain text, the policy goes on
            return Reply("", is_call=False)
        if isinstance(call, str):  # a malformed call: the policy is told why
            return Reply(self.fmt.response_text(self.tokenizer, call), error=True)
        result = self.runner.call(call)
        return Reply(self.fmt.response_text(self.tokenizer, result.text), result.error, result.timed_out)


@torch.no_grad()
def multi_turn_generate(engine: RolloutEngine, prompt_ids: Tensor, prompt_mask: Tensor, params: SamplingParams,
                        generator: torch.Generator | None, interaction: ToolInteraction, tokenizer,
                        max_turns: int) -> RolloutBatch:
    """Sample conversations of at most `max_turns` policy turns and `params.max_new_tokens` tokens (see above)."""
    device, B = prompt_ids.device, prompt_ids.size(0)
    prompts = [ids[m.bool()].tolist() for ids, m in zip(prompt_ids.cpu(), prompt_mask.cpu())]
    pieces: list[list[tuple[list[int], list[float], bool]]] = [[] for _ in range(B)]  # (ids, logps, trained)
    used = [0] * B  # completion tokens so far
    truncated = [False] * B
    stats = {k: [0.0] * B for k in ("turns", "tool_calls", "tool_errors", "tool_timeouts")}
    stops = tuple(params.stop_token_ids) + interaction.stop_token_ids
    active = list(range(B))
    for turn in range(max_turns):
        if not active:
            break
        budget = max(params.max_new_tokens - used[i] for i in active)
        ids, mask = left_pad([prompts[i] + [t for p in pieces[i] for t in p[0]] for i in active],
                             params.pad_token_id)
        turn_params = replace(params, max_new_tokens=budget, stop_token_ids=stops,
                              min_new_tokens=params.min_new_tokens if turn == 0 else 0)
        out = engine.generate(ids.to(device), mask.to(device), turn_params, generator)
        still = []
        for j, i in enumerate(active):
            n = min(int(out.completion_mask[j].sum()), params.max_new_tokens - used[i])
            toks = out.completion_ids[j, :n].tolist()
            pieces[i].append((toks, out.logprobs[j, :n].tolist(), True))
            used[i] += n
            stats["turns"][i] += 1
            last = toks[-1] if toks else None
            if last == params.eos_token_id:
                continue
            at_call = last in interaction.stop_token_ids
            if not at_call or turn == max_turns - 1 or used[i] >= params.max_new_tokens:
                truncated[i] = True  # no EOS: the budget, the turn limit, or a call that cannot be answered
                continue
            reply = interaction.reply(tokenizer.decode(toks))
            stats["tool_calls"][i] += float(reply.is_call)
            stats["tool_errors"][i] += float(reply.error)
            stats["tool_timeouts"][i] += float(reply.timed_out)
            r_ids = tokenizer(reply.text, add_special_tokens=False)["input_ids"][: params.max_new_tokens - used[i]]
            pieces[i].append((r_ids, [0.0] * len(r_ids), False))
            used[i] += len(r_ids)
            if used[i] >= params.max_new_tokens:
                truncated[i] = True
            else:
                still.append(i)
        active = still
    return _assemble(prompt_ids, prompt_mask, pieces, truncated, stats, params.pad_token_id, device)


def _assemble(prompt_ids: Tensor, prompt_mask: Tensor, pieces, truncated: list[bool], stats: dict[str, list],
              pad_id: int, device) -> RolloutBatch:
    """The rows' pieces as one right-padded RolloutBatch [B, T] with the action mask."""
    B = len(pieces)
    T = max(1, max(sum(len(p[0]) for p in row) for row in pieces))
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    mask = torch.zeros((B, T), dtype=torch.long)
    action = torch.zeros((B, T), dtype=torch.long)
    logps = torch.zeros((B, T), dtype=torch.float32)
    for i, row in enumerate(pieces):
        t = 0
        for toks, lps, trained in row:
            n = len(toks)
            ids[i, t:t + n] = torch.tensor(toks, dtype=torch.long)
            mask[i, t:t + n] = 1
            action[i, t:t + n] = int(trained)
            logps[i, t:t + n] = torch.tensor(lps, dtype=torch.float32)
            t += n
    turns = TurnStats(**{k: torch.tensor(v, device=device) for k, v in stats.items()})
    return RolloutBatch(prompt_ids=prompt_ids, prompt_mask=prompt_mask, completion_ids=ids.to(device),
                        completion_mask=mask.to(device), logprobs=logps.to(device),
                        is_truncated=torch.tensor(truncated, device=device), action_mask=action.to(device),
                        turns=turns)


def marked_conversations(tokenizer, samples: RolloutBatch) -> list[str]:
    """The completions as the sample tables show them: every tool / environment reply wrapped in `<<tool: ...>>`
    (spans where `action_mask` is 0), so a reader sees which text the policy wrote. [B] strings."""
    out = []
    for ids, m, a in zip(samples.completion_ids.tolist(), samples.completion_mask.tolist(),
                         samples.trained_mask.tolist()):
        text, span, span_trained = [], [], None
        for tok, real, trained in zip(ids, m, a):
            if not real or tok == tokenizer.eos_token_id:
                continue
            if span and trained != span_trained:
                text.append(tokenizer.decode(span) if span_trained else f"<<tool: {tokenizer.decode(span)}>>")
                span = []
            span.append(tok)
            span_trained = trained
        if span:
            text.append(tokenizer.decode(span) if span_trained else f"<<tool: {tokenizer.decode(span)}>>")
        out.append("".join(text))
    return out
