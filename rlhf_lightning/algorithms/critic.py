"""PPO's critic: a value head V(s_t) on a causal-LM backbone, and the dropout switches PPO needs.

"The N+ Implementation Details of RLHF with PPO" (Huang et al. 2024): the critic starts from the reward model
(backbone and its score head) when there is one, dropout is off in policy and critic, and V(s_t) is read at the
position whose logits predict token t.
"""

from __future__ import annotations

from torch import Tensor, nn


class ValueModel(nn.Module):
    """V(s_t) at every position: a causal-LM backbone (e.g. `Qwen2Model`) + a scalar `head` (Linear(hidden, 1)).

    `backbone=None` is the shared critic: the module holds only the head, and the caller feeds it the policy's
    last hidden state through `values_from_hidden` (so the policy backbone is not registered twice).
    """

    def __init__(self, backbone: nn.Module | None, hidden_size: int, head: nn.Linear | None = None):
        super().__init__()
        self.backbone = backbone
        if head is None:
            # A fresh head starts at V = 0 everywhere. A randomly initialised one (std 1/sqrt(hidden + 1), the
            # "N+ details" reward-head init) gives values of std ~1 that differ token by token, and on the first
            # rollouts those differences ARE the advantages: measured on the addition task, they wreck an SFT
            # policy before the critic catches up. With V = 0 the first updates are REINFORCE on the whitened
            # return, and the gradient still reaches the head (its input is not 0), so it learns from step 1.
            head = nn.Linear(hidden_size, 1)
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)
        self.head = head

    def values_from_hidden(self, hidden: Tensor) -> Tensor:
        """hidden [B, L, H] -> values [B, L] (float32)."""
        return self.head(hidden.to(self.head.weight.dtype)).squeeze(-1).float()

    def forward(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor) -> Tensor:
        """Values at every position of input_ids [B, L] -> [B, L] float32 (separate critic only)."""
        if self.backbone is None:
            raise ValueError("a shared ValueModel has no backbone: call values_from_hidden with the policy's hidden "
                             "states")
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                               use_cache=False).last_hidden_state  # [B, L, H]
        return self.values_from_hidden(hidden)


def disable_dropout_in_model(model: nn.Module) -> None:
    """Set every dropout probability to 0 ("N+ details": with dropout on, the first PPO ratio is not 1 and the
    KL/values of the rollout disagree with the training passes). Covers nn.Dropout and HF's attention dropout."""
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
        if isinstance(getattr(m, "attention_dropout", None), float):
            m.attention_dropout = 0.0


def has_active_dropout(model: nn.Module) -> bool:
    """Whether a forward in train mode differs from eval mode through dropout (nn.Dropout p > 0 or HF's
    `attention_dropout`)."""
    def active(m: nn.Module) -> bool:
        rate = getattr(m, "attention_dropout", None)
        return (isinstance(m, nn.Dropout) and m.p > 0) or (isinstance(rate, float) and rate > 0)

    return any(active(m) for m in model.modules())
