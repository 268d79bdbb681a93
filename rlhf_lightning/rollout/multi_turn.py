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

With an environment (`environments.Environment`, one episode per row) a turn that ends at EOS is answered by its
`step(turn)`: the observation is appended like a tool's reply (attended, `action_mask` 0), the turn's reward is
kept (`RolloutBatch.env_rewards`, with the index of the turn's last token in `env_ends`), and `done` finishes the
row. Its `reset(row)` message opens the completion the same way.

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


class EnvironmentInteraction:
    """Plays one episode of an environment per rollout row (`environments.Environment`): a fresh object from
    `factory` per row, `reset(row)` before the first turn, `step(turn)` after every turn that is not a tool call.
    Observations of a conversational row (its prompt is chat messages) are written as the tokenizer's chat
    template writes a user message after the assistant's turn; of a plain-text row, as they are."""

    def __init__(self, factory, tokenizer) -> None:
        self.factory, self.tokenizer = factory, tokenizer

    def start(self, rows: list[dict]) -> tuple[list, list[bool], list[str]]:
        """(one episode object per row, whether each row is a conversation, each one's first message)."""
        from ..environments.base import checked_reset

        episodes = [self.factory() for _ in rows]
        chats = [isinstance(r.get("prompt"), list) for r in rows]
        firsts = [self.observation_text(checked_reset(e, r, i), chat, first=True)
                  for i, (e, r, chat) in enumerate(zip(episodes, rows, chats))]
        return episodes, chats, firsts

    def step(self, episode, turn_text: str, row: int):
        from ..environments.base import checked_step

        return checked_step(episode, turn_text, row)

    def observation_text(self, text: str, chat: bool, first: bool = False) -> str:
        """`text` as the completion shows it: as is for a plain-text row; for a conversation, a user message
        after the assistant's turn — after its EOS, or (`first`: `reset`'s message, before the policy wrote
        anything) after an empty assistant turn the template closes."""
        if not text or not chat:
            return text
        from ..tools.formats import chat_reply_text

        return chat_reply_text(self.tokenizer, "user", text, "environment", after_eos=not first)


@torch.no_grad()
def multi_turn_generate(engine: RolloutEngine, prompt_ids: Tensor, prompt_mask: Tensor, params: SamplingParams,
                        generator: torch.Generator | None, interaction: ToolInteraction | None, tokenizer,
                        max_turns: int, env: EnvironmentInteraction | None = None,
                        rows: list[dict] | None = None) -> RolloutBatch:
    """Sample conversations of at most `max_turns` policy turns and `params.max_new_tokens` tokens (see above):
    tool calls answered by `interaction`, other turns by `env` (one episode per row of `rows`), either optional."""
    device, B = prompt_ids.device, prompt_ids.size(0)
    prompts = [ids[m.bool()].tolist() for ids, m in zip(prompt_ids.cpu(), prompt_mask.cpu())]
    pieces: list[list[tuple[list[int], list[float], bool]]] = [[] for _ in range(B)]  # (ids, logps, trained)
    used = [0] * B  # completion tokens so far
    stats = {k: [0.0] * B for k in ("turns", "tool_calls", "tool_errors", "tool_timeouts")}
    budget_of = params.max_new_tokens

    def answer_ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

    def append(i: int, ids: list[int]) -> None:  # an answer (tool / environment): attended, not trained, log-prob 0
        ids = ids[: budget_of - used[i]]
        pieces[i].append((ids, [0.0] * len(ids), False))
        used[i] += len(ids)

    episodes = env_rewards = env_ends = env_done = None
    turn_start = [0] * B  # the piece where the row's current environment turn began
    if env is not None:
        if rows is None or len(rows) != B:
            raise ValueError(f"an environment needs the dataset row of each of the {B} rollout rows, got "
                             f"{None if rows is None else len(rows)}")
        episodes, chats, firsts = env.start(rows)
        env_rewards, env_ends, env_done = [[] for _ in range(B)], [[] for _ in range(B)], [False] * B
        for i, first in enumerate(firsts):
            append(i, answer_ids(first))
            turn_start[i] = len(pieces[i])
    tool_stops = interaction.stop_token_ids if interaction is not None else ()
    stops = tuple(params.stop_token_ids) + tuple(tool_stops)
    active = [i for i in range(B) if used[i] < budget_of]
    truncated = [used[i] >= budget_of for i in range(B)]
    for turn in range(max_turns):
        if not active:
            break
        budget = max(budget_of - used[i] for i in active)
        ids, mask = left_pad([prompts[i] + [t for p in pieces[i] for t in p[0]] for i in active],
                             params.pad_token_id)
        turn_params = replace(params, max_new_tokens=budget, stop_token_ids=stops,
                              min_new_tokens=params.min_new_tokens if turn == 0 else 0)
        out = engine.generate(ids.to(device), mask.to(device), turn_params, generator)
        still = []
        for j, i in enumerate(active):
            n = min(int(out.completion_mask[j].sum()), budget_of - used[i])
            toks = out.completion_ids[j, :n].tolist()
            pieces[i].append((toks, out.logprobs[j, :n].tolist(), True))
            used[i] += n
            stats["turns"][i] += 1
            last = toks[-1] if toks else None
            can_go_on = turn < max_turns - 1 and used[i] < budget_of
            if last in tool_stops:  # a tool call: the tool answers (a call in the last turn is cut off)
                if not can_go_on:
                    truncated[i] = True
                    continue
                reply = interaction.reply(tokenizer.decode(toks))
                stats["tool_calls"][i] += float(reply.is_call)
                stats["tool_errors"][i] += float(reply.error)
                stats["tool_timeouts"][i] += float(reply.timed_out)
                append(i, answer_ids(reply.text))
                if used[i] < budget_of:
                    still.append(i)
                else:
                    truncated[i] = True
                continue
            ended = last == params.eos_token_id
            truncated[i] = not ended  # no EOS: the token budget (or a turn limit) cut the policy off
            if env is None:
                continue
            turn_ids = [t for p in pieces[i][turn_start[i]:] for t in p[0] if t != params.eos_token_id]
            step = env.step(episodes[i], tokenizer.decode(turn_ids), i)
            env_rewards[i].append(step.reward)
            env_ends[i].append(used[i] - 1)  # the turn's last token: where a per-turn reward lands
            if step.done:
                env_done[i] = True
                continue
            if not ended or not can_go_on:
                continue
            obs = answer_ids(env.observation_text(step.observation, chats[i]))
            if used[i] + len(obs) >= budget_of:
                continue  # no room for the observation and a reply: the episode ends here (the turn ended at EOS)
            append(i, obs)
            turn_start[i] = len(pieces[i])
            still.append(i)
        active = still
    batch = _assemble(prompt_ids, prompt_mask, pieces, truncated, stats, params.pad_token_id, device)
    if env is not None:
        batch.env_rewards, batch.env_ends = env_rewards, env_ends
        batch.turns.env_done = torch.tensor(env_done, dtype=torch.float32, device=device)
    return batch


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
