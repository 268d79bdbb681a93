"""A rollout engine whose completions are a known function of the prompt and the sample's index, so the sampled
evaluation's metrics can be computed by hand (also imported by the two-process DDP script of test_evaluation.py).

For an addition prompt "a+b=" with sum s, sample j of `N` (rows come as N consecutive copies of each prompt) is
the right sum when j < s % (N + 1), else one of "x" (no answer), s + 1 and s + 2, by (j + s) % 3. Greedy calls
(validation's `val/accuracy`) answer as sample 0 does. `register()` makes it `rollout_engine: scripted` (tests
do it in a fixture that restores the registry, so the engine names other tests check stay the built-ins).
"""

from __future__ import annotations

import torch

from rlhf_lightning.rollout import RolloutBatch, RolloutEngine, register_engine
from rlhf_lightning.tokenizer import build_char_tokenizer

N = 8  # eval_num_samples the tests use with this engine
TOKENIZER = build_char_tokenizer()


def scripted_completion(prompt: str, j: int) -> str:
    a, b = (int(x) for x in prompt.rstrip("=").split("+"))
    s = a + b
    if j < s % (N + 1):
        return str(s)
    return ["x", str(s + 1), str(s + 2)][(j + s) % 3]


class ScriptedEngine(RolloutEngine):
    def generate(self, prompt_ids, prompt_mask, params, generator=None):
        texts = []
        for r in range(prompt_ids.size(0)):
            prompt = TOKENIZER.decode(prompt_ids[r][prompt_mask[r].bool()].tolist())
            texts.append(scripted_completion(prompt, 0 if params.greedy else r % N))
        ids = [TOKENIZER(t, add_special_tokens=False)["input_ids"] + [params.eos_token_id] for t in texts]
        T = max(map(len, ids))
        completion = torch.full((len(ids), T), params.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(completion)
        for r, row in enumerate(ids):
            completion[r, :len(row)] = torch.tensor(row)
            mask[r, :len(row)] = 1
        return RolloutBatch(prompt_ids, prompt_mask, completion.to(prompt_ids.device), mask.to(prompt_ids.device),
                            torch.zeros(completion.shape, device=prompt_ids.device),
                            torch.zeros(len(ids), dtype=torch.bool, device=prompt_ids.device))


def register() -> None:
    register_engine("scripted")(ScriptedEngine)
