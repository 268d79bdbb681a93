"""`RewardModelSource`: a sequence reward model (a `RewardModel` export, a `RewardModel`, or a bare classifier) as
a reward source. The one scoring path of GRPO's `reward_model`, PPO's `reward_model` and the iterative callback."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .functions import _check_inputs
from .interface import RewardOutput, RewardSource

if TYPE_CHECKING:
    from ..modules.reward_model import RewardModel


class RewardModelSource(RewardSource):
    """A trained reward model as a reward source (`score(...) -> RewardOutput`), a TRL reward function
    (`source(prompts, completions, **columns) -> list[float]`), and a scorer of token ids (`score_ids`, PPO's).

    `model_dir_or_module`: an exported `hf_model/` directory (or hub id), a `RewardModel`, or a bare sequence-
    classification model (then `tokenizer` is required). Prompts/completions may be strings or chat messages
    (TRL's conversational format). Each pair is scored as `reward_input_ids(prompt, completion)` builds it, the
    same as in training. Extra columns are accepted and ignored.

    normalize: return (score − mean) / std. `mean`/`std` default to the statistics recorded with the model
        (`reward_mean`/`reward_std` from its last validation); with none recorded, give them explicitly.
        Normalising keeps RL hyper-parameters (KL coefficient, clipping) meaningful across reward models.
    batch_size: completions per forward pass. device: where to run (default: where the model already is).
    A module's weights and statistics are shared, not copied: scores follow its training (iterative RL).
    """

    __name__ = "reward_model"  # how reward-function logs name it
    learned = True  # a model's opinion, not a verifier: val/accuracy uses the task's verifier

    def __init__(self, model_dir_or_module: str | os.PathLike | nn.Module, tokenizer: Any = None,
                 normalize: bool = False, mean: float | None = None, std: float | None = None,
                 batch_size: int = 64, device: str | torch.device | None = None):
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        from ..models import load_sequence_classifier
        from ..modules.reward_model import RewardModel
        from ..tokenizer import load_tokenizer

        source = model_dir_or_module
        self._module: RewardModel | None = None
        if isinstance(source, RewardModel):
            self.model, tok, self._module = source.model, source.tokenizer, source
        elif isinstance(source, nn.Module):
            if tokenizer is None:
                raise ValueError("RewardModelSource needs `tokenizer` when given a bare model")
            self.model, tok = source, None
        elif isinstance(source, (str, os.PathLike)):
            tok = load_tokenizer(tokenizer if isinstance(tokenizer, (str, os.PathLike)) else os.fspath(source))
            self.model = load_sequence_classifier(os.fspath(source), tok, require_trained_head=True)
        else:
            raise ValueError(f"model_dir_or_module must be a directory, a RewardModel or a model, "  # noqa: TRY004
                             f"got {type(source).__name__}")
        if tokenizer is not None and not isinstance(tokenizer, (str, os.PathLike)):
            tok = tokenizer
        self.tokenizer = tok
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = tok.pad_token_id
        if device is not None:
            self.model.to(device)
        self.normalize, self.batch_size = normalize, batch_size
        self._mean, self._std = mean, std
        if normalize:
            if self.mean is None or self.std is None:
                raise ValueError("normalize=True but the reward model has no recorded reward_mean/reward_std "
                                 "(train it with validation data); pass mean and std")
            if not self.std > 0:
                raise ValueError(f"std must be > 0 to normalise, got {self.std}")

    def _recorded(self, name: str) -> float | None:
        """`reward_<name>` as recorded with the model: a live module's latest validation, else its export's config."""
        source = self._module if self._module is not None else self.model.config
        return getattr(source, f"reward_{name}", None)

    @property
    def mean(self) -> float | None:
        """The explicit `mean`, else the one recorded with the model."""
        return self._mean if self._mean is not None else self._recorded("mean")

    @property
    def std(self) -> float | None:
        """The explicit `std`, else the one recorded with the model."""
        return self._std if self._std is not None else self._recorded("std")

    def statistics(self) -> tuple[float | None, float | None]:
        return self.mean, self.std

    def set_statistics(self, mean: float, std: float) -> None:
        """New score statistics (e.g. after the reward model was retrained: iterative RL), stored where `mean` and
        `std` read them: the live `RewardModel`, else the model's config (so an export carries them). Explicit
        `mean` / `std` given to the constructor still take precedence."""
        if self._module is not None:
            self._module.reward_mean, self._module.reward_std = mean, std
        else:
            self.model.config.reward_mean, self.model.config.reward_std = mean, std

    def _prompt_text(self, prompt: Any) -> str:
        from ..data.rows import prompt_text

        return prompt_text(self.tokenizer, prompt)

    def score(self, prompts, completions, columns=None) -> RewardOutput:
        """The scores as a `RewardOutput` (per_source: `reward_model`), prompts given as TRL gives them."""
        prompts, completions, _ = _check_inputs(prompts, completions, columns)
        scores = torch.tensor(self(prompts, completions), dtype=torch.float32)
        return RewardOutput(scores, {self.name: scores})

    def __call__(self, prompts: list[Any], completions: list[Any], **kwargs: Any) -> list[float]:
        """A TRL reward function: one score per (prompt, completion) text pair, as `reward_input_ids` builds it."""
        from ..data.rows import response_text
        from .model_inputs import reward_input_ids, right_pad

        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
        if not prompts:
            return []
        seqs = [reward_input_ids(self.tokenizer, self._prompt_text(p), response_text(c, "completion"))
                for p, c in zip(prompts, completions)]
        chunks = [right_pad(seqs[i:i + self.batch_size], self.tokenizer.pad_token_id)
                  for i in range(0, len(seqs), self.batch_size)]  # ([b, L], [b, L]) each
        scores = self._batched(chunks, self._classifier_logits).tolist()
        if self.normalize:
            scores = [(s - self.mean) / self.std for s in scores]
        return scores

    def score_ids(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                  batch_size: int | None = None) -> torch.Tensor:
        """Raw scores [N] of token ids already in the model's vocabulary (PPO: the policy's prompt + completion,
        any padding): the `score` head on the hidden state of the last attended token. The backbone and the head
        are called separately, so under FSDP2 the backbone can be sharded while the head stays replicated."""
        size = batch_size or input_ids.shape[0]
        chunks = [(ids, attn, pos) for ids, attn, pos in zip(input_ids.split(size), attention_mask.split(size),
                                                            position_ids.split(size))]
        return self._batched(chunks, self._head_at_last_token)

    @torch.no_grad()
    def _batched(self, chunks: list[tuple[torch.Tensor, ...]], forward: Callable) -> torch.Tensor:
        """`forward(*chunk)` of every chunk in eval mode (dropout off), the model's mode restored after. [N]"""
        device = next(self.model.parameters()).device
        with eval_mode(self.model):
            return torch.cat([forward(*(t.to(device) for t in chunk)).float() for chunk in chunks])

    def _classifier_logits(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        # right-padded `reward_input_ids`: the classifier's "last non-pad token" is the last real one (model_inputs.py)
        return self.model(input_ids=ids, attention_mask=mask).logits[:, 0]  # [b]

    def _head_at_last_token(self, ids: torch.Tensor, attn: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        hidden = self.model.base_model(input_ids=ids, attention_mask=attn, position_ids=pos,
                                       use_cache=False).last_hidden_state  # [b, L, H]
        last = (torch.arange(attn.shape[1], device=attn.device) * attn).argmax(-1)  # [b] last attended position
        return self.model.score(hidden[torch.arange(len(ids), device=hidden.device), last]).squeeze(-1)  # [b]


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """`model` in eval mode (dropout off) for a scoring pass; its own mode restored after."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def load_frozen_reward_model(name_or_path: str | os.PathLike, policy_tokenizer: Any, policy_name: str, *,
                             torch_dtype: str | None = None, trust_remote_code: bool = False,
                             seed: int = 0) -> nn.Module:
    """A frozen sequence classifier with a scalar `score` head that reads the policy's token ids directly (PPO's
    `reward_model`): its tokenizer must be the policy's (`policy_name` names it in the error), its embedding
    cover the policy's vocabulary. Scored through `RewardModelSource.score_ids`."""
    from ..models import load_sequence_classifier
    from ..tokenizer import load_tokenizer

    if str(name_or_path).endswith(".ckpt"):
        raise ValueError(f"reward_model {name_or_path!r} is a Lightning checkpoint; pass the RewardModel's "
                         "hf_model export directory (written by save_pretrained at the end of its fit)")
    rm = load_sequence_classifier(name_or_path, policy_tokenizer, torch_dtype=torch_dtype,
                                  trust_remote_code=trust_remote_code, seed=seed, require_trained_head=True)
    if not isinstance(getattr(rm, "score", None), nn.Linear) or rm.score.out_features != 1:
        raise ValueError(f"reward_model {name_or_path!r} ({type(rm).__name__}) has no scalar `score` head "
                         "(Linear(hidden, 1)); use a sequence classifier with num_labels=1")
    try:
        rm_tokenizer = load_tokenizer(name_or_path, trust_remote_code=trust_remote_code)
    except ValueError:  # a directory without tokenizer files: only the embedding size can be checked
        rm_tokenizer = None
    if rm_tokenizer is not None and rm_tokenizer.get_vocab() != policy_tokenizer.get_vocab():
        raise ValueError(f"reward_model {name_or_path!r} has a different tokenizer than the policy {policy_name!r}; "
                         "PPO scores the policy's token ids directly, so both must share one vocabulary")
    if rm.get_input_embeddings().num_embeddings < len(policy_tokenizer):
        raise ValueError(f"reward_model {name_or_path!r} embeds {rm.get_input_embeddings().num_embeddings} "
                         f"tokens but the policy's tokenizer has {len(policy_tokenizer)}")
    rm.requires_grad_(False)  # frozen; `RewardModelSource` switches it to eval mode for every use
    return rm
