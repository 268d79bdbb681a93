"""Rewards: the TRL reward-function protocol, the built-in verifiers, and reward sources.

The protocol is TRL's, so TRL reward functions port unchanged:

    f(prompts: list[str], completions: list[str], **columns) -> list[float | None]

`columns` are the dataset's other columns (e.g. `answer`) as lists aligned with `completions`; a function
must accept `**kwargs` because it receives every column. `None` means "no opinion on this row" (e.g. a
math verifier asked about a code prompt) and is ignored when rewards are combined.

Conversational data (prompts that are lists of chat messages) gets TRL's conversational format, as TRL's
GRPOTrainer passes it: `prompts` are the message lists and each completion is `[{"role": "assistant",
"content": text}]`, so TRL's conversational reward functions (`completion[0]["content"]`) run unchanged
(`trl_inputs`). The built-in functions accept both formats.

Process-supervision functions (GRPO §4.1.3) have the same inputs and return one list of step rewards per
completion, where the steps are `completion.split(task.step_separator)`.

Reward sources (`RewardSource.score(prompts, completions, columns) -> RewardOutput`) are what the modules score
with: a function becomes a `FunctionSource`, a reward model is a `RewardModelSource`, a process reward model a
`ProcessRewardModelSource` (step scores, or one aggregated reward), and `WeightedSources` combines them;
`RewardOutput.per_source` carries each source's values to the `reward/<name>` metrics.

Math answers: `answers.extract_answer` is the one answer extractor (the math reward, `maj@k` votes and the sample
tables read answers through it), and `math_answer_match` verifies them with math-verify (`math_answers`).

Layout: `builtin` (the verifiers), `answers` (final answers), `math_answers` (the math-verify reward and its worker
process, `math_worker`), `functions` (resolving and checking functions), `interface` (`RewardSource`,
`RewardOutput`), `sources` (function sources and the weighted combination), `model` (the reward model),
`process_model` (the process reward model), `model_inputs` (what each reads).
"""

from .answers import canonical_answer, extract_answer, reference_answer
from .builtin import (
    CHAT_PROMPTS,
    REWARD_FNS,
    apply_op,
    chain_final_correct,
    chain_process_rewards,
    chain_step_rewards,
    chain_steps,
    environment_reward,
    environment_turn_rewards,
    exact_match,
    final_answer_match,
    last_number,
    parse_chain,
)
from .functions import (
    NONFINITE_MODES,
    check_finite_rewards,
    check_reward_weights,
    check_signature,
    resolve_reward_fn,
    reward_fn_name,
    trl_inputs,
)
from .interface import RewardOutput, RewardSource
from .math_answers import MathVerifier, math_answer_match
from .model import RewardModelSource
from .process_model import ProcessRewardModelSource
from .sources import FunctionSource, WeightedSources, as_source, call_reward_fns, call_step_reward_fns

REWARD_FNS["math_answer_match"] = math_answer_match  # a short name like the built-ins (it lives in its own module)

__all__ = [
    "CHAT_PROMPTS", "NONFINITE_MODES", "REWARD_FNS", "FunctionSource", "MathVerifier", "ProcessRewardModelSource",
    "RewardModelSource", "RewardOutput", "RewardSource", "WeightedSources", "apply_op", "as_source", "call_reward_fns",
    "call_step_reward_fns", "canonical_answer", "chain_final_correct", "chain_process_rewards", "chain_step_rewards",
    "chain_steps",
    "check_finite_rewards", "check_reward_weights", "check_signature", "environment_reward",
    "environment_turn_rewards", "exact_match", "extract_answer",
    "final_answer_match", "last_number", "math_answer_match", "parse_chain", "reference_answer", "resolve_reward_fn",
    "reward_fn_name", "trl_inputs",
]
