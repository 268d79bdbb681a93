"""PPOModule: forward passes against independent computations, reward wiring, two optimizers, resume, learning."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from rlhf_lightning.cli import cli_main
from rlhf_lightning.data import PromptDataModule
from rlhf_lightning.data.tasks import AdditionTask
from rlhf_lightning.evaluation import greedy_accuracy
from rlhf_lightning.models import load_causal_lm, load_sequence_classifier
from rlhf_lightning.modules.ppo import PPOModule
from rlhf_lightning.rewards import reward_fn_name
from rlhf_lightning.rollout import RolloutBatch, completion_logprobs, sample, token_logprobs
from rlhf_lightning.tokenizer import build_char_tokenizer

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SCRIPT = Path(sys.executable).parent / "rlhf-lightning"  # the console script users run


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run faster on one thread than on two contended ones."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def digit_fraction(prompts, completions, **kwargs):
    """A dense reward a random tiny model can climb quickly: the share of digits in the completion."""
    return [sum(c.isdigit() for c in s) / max(1, len(s)) for s in completions]


def make_trainer(tmp_path, max_steps: int, **kwargs) -> L.Trainer:
    kwargs.setdefault("callbacks", [])
    return L.Trainer(max_steps=max_steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, default_root_dir=tmp_path, limit_val_batches=0,
                     num_sanity_val_steps=0, **kwargs)


def make_data(batch_size: int = 8, num_train: int = 256) -> PromptDataModule:
    return PromptDataModule(task="addition", num_train=num_train, num_val=0, batch_size=batch_size)


def padded_ctx(tok, prompts: list[str], completions: list[list[int]]) -> dict[str, torch.Tensor]:
    """Left-padded prompts and right-padded completions (token id lists), as the rollout produces them."""
    p_ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    P, T = max(map(len, p_ids)), max(map(len, completions))
    ctx = {"prompt_ids": torch.full((len(p_ids), P), tok.pad_token_id), "prompt_mask": torch.zeros(len(p_ids), P),
           "completion_ids": torch.full((len(p_ids), T), tok.pad_token_id),
           "completion_mask": torch.zeros(len(p_ids), T)}
    for i, (p, c) in enumerate(zip(p_ids, completions)):
        ctx["prompt_ids"][i, P - len(p):] = torch.tensor(p)
        ctx["prompt_mask"][i, P - len(p):] = 1
        ctx["completion_ids"][i, :len(c)] = torch.tensor(c)
        ctx["completion_mask"][i, :len(c)] = 1
    return {k: v.long() for k, v in ctx.items()}


def unpadded_rows(ctx):
    """Each row's real tokens alone (no padding at all), with the length of its prompt."""
    for i in range(ctx["prompt_ids"].shape[0]):
        p = ctx["prompt_ids"][i][ctx["prompt_mask"][i].bool()]
        c = ctx["completion_ids"][i][ctx["completion_mask"][i].bool()]
        yield torch.cat([p, c]).unsqueeze(0), len(p), len(c)


# ------------------------------------------------------------------------------------------------ forward passes
def test_token_logprobs_hand_computed():
    # logits (0, ln 3, 0): p = (1/5, 3/5, 1/5); at temperature 2: (1, √3, 1) / (2 + √3)
    logits = torch.tensor([[[0.0, math.log(3.0), 0.0], [0.0, math.log(3.0), 0.0]]])  # [1, 2, 3]
    ids, mask = torch.tensor([[1, 0]]), torch.tensor([[1, 0]])
    logp, ent = token_logprobs(logits, ids, mask, temperature=1.0)
    assert logp[0, 0].item() == pytest.approx(math.log(3 / 5), abs=1e-6)
    assert ent[0, 0].item() == pytest.approx(-(2 * 0.2 * math.log(0.2) + 0.6 * math.log(0.6)), abs=1e-6)
    assert logp[0, 1].item() == 0.0 and ent[0, 1].item() == 0.0  # masked
    logp2, _ = token_logprobs(logits, ids, mask, temperature=2.0)
    assert logp2[0, 0].item() == pytest.approx(math.log(math.sqrt(3) / (2 + math.sqrt(3))), abs=1e-6)


@pytest.mark.parametrize("critic", ["separate", "shared"])
def test_policy_and_values_match_unpadded_rows(critic):
    """Log-probs and values of a left/right-padded batch equal those of each row alone, at the right positions."""
    m = PPOModule("tiny", reward_fns=[digit_fraction], critic=critic, temperature=0.7, kl_coef=0.0)
    tok = m.tokenizer
    ctx = padded_ctx(tok, ["7+5=", "12+30="], [tok("12", add_special_tokens=False)["input_ids"] + [1],
                                               tok("4", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        logp, entropy, values = m.policy_and_values(ctx)  # [2, 3]
        ref = completion_logprobs(m.policy, **ctx, temperature=0.7)
        torch.testing.assert_close(logp, ref, atol=1e-5, rtol=0)
        for i, (row, P, n) in enumerate(unpadded_rows(ctx)):
            backbone = m.policy.model if critic == "shared" else m.value_model.backbone
            hidden = backbone(input_ids=row).last_hidden_state[0]  # [P + n, H]
            want = m.value_model.head(hidden[P - 1:P - 1 + n]).squeeze(-1)  # value of the state before token t
            torch.testing.assert_close(values[i, :n], want, atol=1e-5, rtol=0)
            logits = m.policy(input_ids=row).logits[0, P - 1:P - 1 + n] / 0.7  # [n, V]
            want_lp = torch.log_softmax(logits, -1).gather(-1, row[0, P:, None]).squeeze(-1)
            torch.testing.assert_close(logp[i, :n], want_lp, atol=1e-5, rtol=0)
            assert (entropy[i, n:] == 0).all()
    if critic == "shared":
        assert m.value_model.backbone is None  # the policy's backbone is not registered twice
        assert [p.shape for p in m.critic_parameters()] == [torch.Size([1, 64]), torch.Size([1])]


@pytest.fixture(scope="module")
def reward_model_dir(tmp_path_factory) -> str:
    """A tiny sequence classifier saved like RewardModel's hf_model export (weights + tokenizer)."""
    out = tmp_path_factory.mktemp("rm")
    tok = build_char_tokenizer()
    load_sequence_classifier("tiny", tok, seed=7).save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


def test_reward_model_scores_last_real_token_and_initialises_critic(reward_model_dir):
    m = PPOModule("tiny", reward_model=reward_model_dir, critic="separate", kl_coef=0.0)
    rm = m.reward_model
    # the separate critic starts as a copy of the reward model: same numbers, its own storage
    for (name, p), q in zip(rm.model.named_parameters(), m.value_model.backbone.parameters()):
        assert torch.equal(p, q) and p.data_ptr() != q.data_ptr(), name
    assert torch.equal(m.value_model.head.weight, rm.score.weight)
    assert all(p.requires_grad for p in m.critic_parameters()) and not any(p.requires_grad for p in rm.parameters())

    tok = m.tokenizer
    ctx = padded_ctx(tok, ["7+5=", "12+30=", "1+1="], [[5, 6, 1], [7], [8, 9]])
    samples = RolloutBatch(**ctx, logprobs=None, is_truncated=torch.tensor([False, True, True]))
    scores = m.reward_model_scores(samples)  # [3]
    with torch.no_grad():
        # HF's own pooling on an unpadded row reads the logit at the last token
        want = torch.stack([rm(input_ids=row).logits[0, 0] for row, _, _ in unpadded_rows(ctx)])
    torch.testing.assert_close(scores, want, atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------------ reward wiring
class Recorder(PPOModule):
    """Fixed scores; records what the hooks receive."""

    def __init__(self, *args, fixed_scores=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.fixed_scores = fixed_scores
        self.seen: list[dict] = []

    def compute_rewards(self, prompts, completions, batch):
        return torch.tensor(self.fixed_scores[:len(completions)])

    def _no_grad_passes(self, ctx):
        old_logp, old_values, ref_logp = super()._no_grad_passes(ctx)
        self.seen.append({"old_logp": old_logp, "ref_logp": ref_logp, "ctx": ctx})
        return old_logp, old_values, ref_logp

    def compute_advantages(self, rewards, values, mask):
        self.seen[-1].update(rewards=rewards, mask=mask, kl_coef=self.kl_ctl.value)
        return super().compute_advantages(rewards, values, mask)

    def policy_loss(self, logp, old_logp, advantages, mask, normalizer):
        self.seen[-1].setdefault("first_ratio_logp", (logp.detach(), old_logp))
        return super().policy_loss(logp, old_logp, advantages, mask, normalizer)


def test_token_rewards_kl_penalty_score_and_missing_eos(tmp_path):
    scores = [1.0, 0.0, 2.0, -1.0]
    m = Recorder("tiny", fixed_scores=scores, kl_coef=0.1, missing_eos_penalty=0.5, max_new_tokens=3,
                 temperature=0.8, ppo_epochs=2, minibatches=2, lr=1e-3)
    make_trainer(tmp_path, max_steps=2 * 2 * 2 * 2).fit(m, make_data(batch_size=4))
    assert m.rollouts == 2 and len(m.seen) == 2
    first, second = m.seen
    # rollout 1: the policy is still the reference, so the KL term is exactly 0 and only the score remains
    assert torch.equal(first["old_logp"], first["ref_logp"])
    for rec in (first, second):
        mask, rewards = rec["mask"], rec["rewards"]
        kl = torch.where(mask, rec["old_logp"] - rec["ref_logp"], 0.0)  # k1
        n = mask.sum(-1)  # real tokens per row (EOS included)
        truncated = torch.tensor([1 not in row[:k].tolist() for row, k in zip(rec["ctx"]["completion_ids"], n)])
        want = -0.1 * kl
        for i in range(4):
            want[i, n[i] - 1] += scores[i] - 0.5 * float(truncated[i])
        torch.testing.assert_close(rewards, want, atol=1e-6, rtol=0)
        assert (rewards[~mask] == 0).all()
        # first minibatch of the first epoch: the training pass reproduces the rollout's log-probs (ratio 1):
        # same temperature, dropout off, no weight change yet
        logp, old = rec["first_ratio_logp"]
        torch.testing.assert_close(logp, old, atol=1e-5, rtol=0)
    assert not torch.equal(second["old_logp"], second["ref_logp"])  # the policy moved after rollout 1


def test_old_logprobs_equal_sampler_logprobs_at_temperature():
    """The temperature divides the logits of the no-grad passes exactly as it did when sampling."""
    m = PPOModule("tiny", reward_fns=[digit_fraction], temperature=0.6, kl_coef=0.1)
    tok = m.tokenizer
    ctx = padded_ctx(tok, ["7+5=", "12+30=", "1+1="], [[5], [5], [5]])
    gen = torch.Generator().manual_seed(0)
    s = sample(m.policy, ctx["prompt_ids"], ctx["prompt_mask"], max_new_tokens=6, eos_token_id=1, pad_token_id=0,
               temperature=0.6, generator=gen)
    old_logp, old_values, ref_logp = m._no_grad_passes(
        {"prompt_ids": s.prompt_ids, "prompt_mask": s.prompt_mask, "completion_ids": s.completion_ids,
         "completion_mask": s.completion_mask})
    torch.testing.assert_close(old_logp, s.logprobs, atol=1e-5, rtol=0)
    torch.testing.assert_close(ref_logp, s.logprobs, atol=1e-5, rtol=0)
    assert old_values.shape == s.completion_ids.shape


# ------------------------------------------------------------------------------------------------ fused old passes
class CountingPPO(PPOModule):
    """Counts the separate no-grad old-policy/critic passes."""

    old_passes = 0

    def _no_grad_passes(self, ctx):
        self.old_passes += 1
        return super()._no_grad_passes(ctx)


@pytest.mark.parametrize("critic", ["separate", "shared"])
def test_fused_old_passes_train_exactly_like_separate_passes(tmp_path, critic):
    """1 epoch x 1 minibatch: π_old / V_old taken from the update's forward (no extra no-grad pass) give the same
    weights after three rollouts as the separate eval-mode passes: it is the same PPO update, two forwards fewer."""
    kwargs = dict(reward_fns=[digit_fraction], critic=critic, ppo_epochs=1, minibatches=1, kl_coef=0.1, lr=3e-3,
                  max_new_tokens=5, temperature=0.9)
    fused, separate = CountingPPO("tiny", **kwargs), CountingPPO("tiny", **kwargs)
    separate.fuse_old_passes = False
    for m, sub in ((fused, "f"), (separate, "s")):
        L.seed_everything(0)
        make_trainer(tmp_path / sub, max_steps=2 * 3).fit(m, make_data(batch_size=4))
    assert (fused.old_passes, separate.old_passes) == (0, 3)
    assert fused.rollouts == separate.rollouts == 3
    moved = 0.0
    for (name, a), b in zip(fused.named_parameters(), separate.parameters()):
        # not bit-equal: the eval-mode pass and the grad forward round differently (~1e-7 in log π), and Adam's
        # first steps (lr x g / |g|) magnify that for gradients near 0; 1e-4 is 3% of one step of lr 3e-3
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0, msg=name)
    for a, b in zip(fused.policy.parameters(), PPOModule("tiny", **kwargs).policy.parameters()):
        moved = max(moved, float((a - b).abs().max()))
    assert moved > 3e-3  # the updates did something (about lr per step)


def test_fused_old_passes_only_where_they_are_exact():
    m = PPOModule("tiny", reward_fns=[digit_fraction], ppo_epochs=1, minibatches=1)
    assert m.fuses_old_passes(8)
    assert not PPOModule("tiny", reward_fns=[digit_fraction], ppo_epochs=2).fuses_old_passes(8)
    assert not PPOModule("tiny", reward_fns=[digit_fraction], ppo_epochs=1, minibatches=2).fuses_old_passes(8)
    micro = PPOModule("tiny", reward_fns=[digit_fraction], ppo_epochs=1, micro_batch_size=4)
    assert micro.fuses_old_passes(4) and not micro.fuses_old_passes(8)  # two micro-batches: two graphs
    budget = PPOModule("tiny", reward_fns=[digit_fraction], ppo_epochs=1, max_tokens_per_micro_batch=40)
    ctx = {"prompt_mask": torch.ones(4, 6), "completion_mask": torch.ones(4, 4)}  # 4 rows x 10 tokens
    assert budget.fuses_old_passes(4, ctx) and not budget.fuses_old_passes(8, {k: v.repeat(2, 1) for k, v in
                                                                               ctx.items()})
    assert not budget.fuses_old_passes(4)  # lengths unknown: the budget may split the rollout
    # dropout makes the train-mode update differ from an eval-mode old pass
    m.policy.model.layers[0].self_attn.attention_dropout = 0.1
    assert not m.fuses_old_passes(8)


# ------------------------------------------------------------------------------------------------ optimizers
@pytest.mark.parametrize("critic", ["separate", "shared"])
def test_two_optimizers_schedulers_and_counters(tmp_path, critic):
    m = PPOModule("tiny", reward_fns=[digit_fraction], critic=critic, lr=1e-3, critic_lr=4e-3, warmup_steps=4,
                  lr_schedule="linear", min_lr_ratio=0.5, ppo_epochs=2, minibatches=2, max_new_tokens=4)
    trainer = make_trainer(tmp_path, max_steps=2 * 3 * 2 * 2)  # both optimizers count: 3 rollouts
    trainer.fit(m, make_data(batch_size=4))
    assert (m.rollouts, m.optimizer_steps, trainer.global_step) == (3, 12, 24)
    actor, critic_opt = m.optimizers()
    actor_sched, critic_sched = m.lr_schedulers()
    assert actor_sched.last_epoch == critic_sched.last_epoch == 12
    # horizon = 12 updates each; after 12 steps: linear decay to min_lr_ratio -> lr x 0.5
    assert m.schedule_horizon() == 12
    assert actor.param_groups[0]["lr"] == pytest.approx(1e-3 * 0.5)
    assert critic_opt.param_groups[0]["lr"] == pytest.approx(4e-3 * 0.5)
    actor_ids = {id(p) for g in actor.param_groups for p in g["params"]}
    critic_ids = {id(p) for g in critic_opt.param_groups for p in g["params"]}
    assert actor_ids == {id(p) for p in m.policy.parameters()}
    assert critic_ids == {id(p) for p in m.value_model.parameters()} and not actor_ids & critic_ids
    if critic == "shared":
        assert len(critic_ids) == 2  # the head's weight and bias only
    # both optimizers really stepped: Adam state for every parameter
    assert all(actor.state[p]["step"] == 12 for p in m.policy.parameters())
    assert all(critic_opt.state[p]["step"] == 12 for p in m.value_model.parameters())


# ------------------------------------------------------------------------------------------------ resume
class SnapshotOnSave(L.Callback):
    """The module's resumable state when a checkpoint is written (first save only)."""

    state: dict | None = None

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        if self.state is None:
            self.state = snapshot(pl_module)


class SnapshotAtStart(L.Callback):
    state: dict | None = None

    def on_train_start(self, trainer, pl_module):
        self.state = snapshot(pl_module)


def snapshot(m: PPOModule) -> dict:
    def clone(x):
        return x.clone() if torch.is_tensor(x) else x
    return {
        "optimizers": [torch.utils._pytree.tree_map(clone, o.optimizer.state_dict()) for o in m.optimizers()],
        "schedulers": [s.state_dict() for s in m.lr_schedulers()],
        "kl": m.kl_ctl.state_dict(),
        "counters": (m.rollouts, m.optimizer_steps),
        "generator": m._generator().get_state().clone(),
    }


def assert_same_state(a: dict, b: dict) -> None:
    assert a["kl"] == b["kl"] and a["counters"] == b["counters"]
    assert torch.equal(a["generator"], b["generator"])
    for sa, sb in zip(a["schedulers"], b["schedulers"]):
        assert sa["last_epoch"] == sb["last_epoch"] and sa["_last_lr"] == sb["_last_lr"]
    for oa, ob in zip(a["optimizers"], b["optimizers"]):
        assert oa["param_groups"] == ob["param_groups"]
        assert oa["state"].keys() == ob["state"].keys() and len(oa["state"]) > 0
        for k in oa["state"]:
            for name in ("step", "exp_avg", "exp_avg_sq"):
                assert torch.equal(torch.as_tensor(oa["state"][k][name]), torch.as_tensor(ob["state"][k][name]))


def test_checkpoint_resume_restores_optimizers_schedulers_kl_controller(tmp_path):
    def module():
        # reward_fns by import path: hyperparameters stay plain strings, so the checkpoint loads with torch's
        # default weights_only=True (a function object in the hparams would need weights_only=False)
        return PPOModule("tiny", reward_fns=["test_ppo.digit_fraction"], adaptive_kl=True, kl_coef=0.2,
                         kl_target=0.05, kl_horizon=20, ppo_epochs=1, minibatches=2, lr=1e-3, critic_lr=2e-3,
                         warmup_steps=6, lr_schedule="cosine", max_new_tokens=4)

    per_rollout = 2 * 1 * 2  # optimizer steps of both optimizers per rollout
    straight, saved = module(), SnapshotOnSave()
    every = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2 * per_rollout,
                                                save_top_k=-1)
    trainer = L.Trainer(max_steps=5 * per_rollout, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path / "a", limit_val_batches=0, num_sanity_val_steps=0,
                        callbacks=[every, saved])
    trainer.fit(straight, make_data(batch_size=4))
    assert saved.state["counters"] == (2, 4)  # the first checkpoint: after 2 rollouts, in the lr warmup
    assert saved.state["kl"]["value"] != 0.2  # the controller had moved
    ckpt = tmp_path / "ckpt" / f"epoch=0-step={2 * per_rollout}.ckpt"
    assert ckpt.exists()

    resumed, at_start = module(), SnapshotAtStart()
    make_trainer(tmp_path / "b", max_steps=5 * per_rollout, callbacks=[at_start]).fit(
        resumed, make_data(batch_size=4), ckpt_path=ckpt)
    assert_same_state(at_start.state, saved.state)
    # and the resumed run continues exactly like the uninterrupted one (data, samples, lr, KL coefficient)
    assert (resumed.rollouts, resumed.optimizer_steps) == (5, 10)
    assert resumed.kl_ctl.value == pytest.approx(straight.kl_ctl.value, rel=1e-6)
    for p, q in zip(straight.policy.parameters(), resumed.policy.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0)
    for p, q in zip(straight.value_model.parameters(), resumed.value_model.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0)


# ------------------------------------------------------------------------------------------------ learning
@pytest.mark.parametrize("critic", ["separate", "shared"])
def test_reward_rises_on_addition_prompts(tmp_path, critic):
    class Scores(L.Callback):
        def __init__(self):
            self.values: list[float] = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.values.append(float(trainer.callback_metrics["reward/score"]))

    rec = Scores()
    m = PPOModule("tiny", reward_fns=[digit_fraction], critic=critic, lr=3e-3, critic_lr=3e-3, kl_coef=0.01,
                  ppo_epochs=2, minibatches=2, max_new_tokens=6, vf_coef=0.5 if critic == "shared" else 0.1)
    rollouts = 20  # measured: ~0.1 -> ~0.9 (separate) / ~0.85 (shared) over the last 5
    make_trainer(tmp_path, max_steps=2 * rollouts * 2 * 2, callbacks=[rec]).fit(m, make_data(batch_size=16))
    assert len(rec.values) == rollouts
    start, end = sum(rec.values[:3]) / 3, sum(rec.values[-5:]) / 5
    assert start < 0.3 and end > start + 0.4, rec.values


DDP_SCRIPT = """
import sys, torch, lightning as L
from rlhf_lightning.data import PromptDataModule
from rlhf_lightning.modules.ppo import PPOModule
torch.set_num_threads(1)
m = PPOModule("tiny", reward_fns=["exact_match"], critic="separate", ppo_epochs=2, minibatches=2, max_new_tokens=4,
              adaptive_kl=True, kl_coef=0.05, kl_target=0.5, kl_horizon=50)
trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=2 * 2 * 2 * 2, logger=False,
                    enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                    default_root_dir=sys.argv[1], limit_val_batches=0)
trainer.fit(m, PromptDataModule(task="addition", num_train=64, num_val=0, batch_size=4))
weights = torch.cat([p.detach().flatten() for p in m.parameters()])
print(f"RANK {trainer.global_rank} {m.rollouts} {trainer.global_step} {m.kl_ctl.value!r} {weights.sum().item()!r}")
"""


@pytest.mark.slow
def test_ddp_two_cpu_processes_train_in_lockstep(tmp_path):
    """Two gloo processes, separate critic, no find_unused_parameters: one combined backward per micro-batch
    gives every trainable parameter a gradient, so DDP's reducer is satisfied; both ranks end identical."""
    from conftest import run_script_processes

    out = run_script_processes(tmp_path, DDP_SCRIPT, str(tmp_path))
    ranks = sorted(line.split()[1:] for line in out.stdout.splitlines() if line.startswith("RANK"))
    assert [r[0] for r in ranks] == ["0", "1"]
    assert ranks[0][1:3] == ["2", "16"]  # 2 rollouts; global_step counts both optimizers
    assert ranks[0][3:] == ranks[1][3:]  # same KL coefficient (the controller sees the all-reduced KL), same weights


# ------------------------------------------------------------------------------------------------ arguments
@pytest.mark.parametrize("kwargs, match", [
    ({"critic": "both"}, "critic must be separate|shared"),
    ({"kl_coef": -0.1}, "kl_coef must be >= 0"),
    ({"kl_estimator": "k4"}, "kl_estimator must be k1|k2|k3"),
    ({"adaptive_kl": True, "kl_coef": 0.0}, "adaptive_kl needs kl_coef > 0"),
    ({"gamma": 1.5}, "gamma must be in"),
    ({"lam": -0.1}, "lam must be in"),
    ({"clip_low": 1.0}, "clip_low must be in"),
    ({"value_clip": 0.0}, "value_clip must be > 0"),
    ({"vf_coef": 0.0}, "vf_coef must be > 0"),
    ({"ppo_epochs": 0}, "ppo_epochs must be"),
    ({"minibatches": 0}, "minibatches must be"),
    ({"missing_eos_penalty": -1.0}, "missing_eos_penalty must be >= 0"),
    ({"min_new_tokens": 40, "max_new_tokens": 32}, "min_new_tokens must be in"),
    ({"temperature": 0.0}, "temperature must be > 0"),
    ({"critic_lr": 2.0}, "critic_lr must be in"),
    ({"reward_model": "run/rm/epoch=0.ckpt"}, "is a Lightning checkpoint"),
    ({"reward_model": "./no/such/dir"}, "does not exist"),
    ({"log_samples_every_n_steps": -1}, "log_samples_every_n_steps must be an integer >= 0"),
])
def test_invalid_arguments_raise_one_line(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PPOModule("tiny", **kwargs)


def test_reward_model_with_another_tokenizer_is_refused(tmp_path):
    tok = build_char_tokenizer()
    tok.add_tokens(["<tool>"])
    load_sequence_classifier("tiny", tok).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="different tokenizer than the policy"):
        PPOModule("tiny", reward_model=str(tmp_path))


def test_fit_without_any_reward_is_refused(tmp_path):
    data = tmp_path / "prompts.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": f"{i}+1="}) for i in range(8)))
    with pytest.raises(ValueError, match="PPOModule has no reward"):
        make_trainer(tmp_path, max_steps=2).fit(PPOModule("tiny"), PromptDataModule(path=str(data), batch_size=4))


def test_minibatches_larger_than_rollout_is_refused(tmp_path):
    m = PPOModule("tiny", reward_fns=[digit_fraction], minibatches=8, max_new_tokens=2)
    with pytest.raises(ValueError, match="minibatches=8 is more than the 4 completions"):
        make_trainer(tmp_path, max_steps=2).fit(m, make_data(batch_size=4))


def test_reward_model_alone_trains_and_task_verifiers_stay_out_of_the_reward(tmp_path, reward_model_dir):
    m = PPOModule("tiny", reward_model=reward_model_dir, critic="separate", kl_coef=0.05, ppo_epochs=1,
                  max_new_tokens=3)
    trainer = make_trainer(tmp_path, max_steps=2 * 2)
    trainer.fit(m, make_data(batch_size=4))
    assert m.rollouts == 2
    assert m.reward_funcs  # the addition task's verifier, kept for val/accuracy ...
    verifiers = {f"reward/{reward_fn_name(f)}" for f in m.reward_funcs}
    assert "reward/score" in trainer.callback_metrics
    assert not verifiers & set(trainer.callback_metrics)  # ... but not scored into the training reward


def test_validation_samples_once_for_reward_model_and_verifiers(tmp_path, reward_model_dir):
    """With a reward model and the task's verifier, one greedy sample per validation batch feeds val/score,
    val/reward and val/accuracy; the score is the reward model's on exactly those completions."""
    m = PPOModule("tiny", reward_model=reward_model_dir, kl_coef=0.05, ppo_epochs=1, max_new_tokens=3)
    samples = []
    real = m.greedy_samples
    m.greedy_samples = lambda *a, **k: samples.append(real(*a, **k)) or samples[-1]
    trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path)
    data = PromptDataModule(task="addition", task_kwargs={"digits": 2}, num_train=64, num_val=4, batch_size=4)
    trainer.validate(m, datamodule=data)
    logged = {k: float(v) for k, v in trainer.callback_metrics.items()}
    assert {"val/score", "val/reward", "val/accuracy"} <= set(logged)
    assert len(samples) == 1  # one validation batch, sampled once
    want = float(m.reward_model_scores(samples[0]).mean())
    assert logged["val/score"] == pytest.approx(want, abs=1e-5)


@pytest.mark.slow
def test_ppo_rm_config_logs_rm_score_beside_verifier_accuracy(tmp_path):
    """configs/ppo_rm.yaml as shipped, run by the console script in a folder holding the two exports it names:
    each validation logs the reward model's val/score AND the task verifier's val/accuracy of the same greedy
    completions, although the verifier is not part of the training reward (no reward/exact_match): the pair that
    shows reward hacking (score up, accuracy down)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tok = build_char_tokenizer()
    for name, model in (("sft_arithmetic", load_causal_lm("tiny", tok, seed=1)),
                        ("rm_arithmetic", load_sequence_classifier("tiny", tok, seed=7))):
        out = tmp_path / "runs" / name / "version_0" / "hf_model"
        model.save_pretrained(out)
        tok.save_pretrained(out)
    args = ["fit", "--config", str(CONFIGS / "ppo_rm.yaml"), "--trainer.max_steps", "8",  # 2 rollouts
            "--trainer.val_check_interval", "1", "--trainer.limit_val_batches", "1",
            "--trainer.enable_progress_bar", "false", "--data.init_args.num_train", "64",
            "--data.init_args.num_val", "16", "--data.init_args.batch_size", "8",
            "--data.init_args.val_batch_size", "16"]
    proc = subprocess.run([str(SCRIPT), *args], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (events_file,) = (tmp_path / "runs").glob("ppo_rm/*/events.out.tfevents.*")
    events = EventAccumulator(str(events_file.parent), size_guidance={"scalars": 0})
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"val/score", "val/accuracy", "reward/score"} <= tags and "reward/exact_match" not in tags
    assert len(events.Scalars("val/score")) == len(events.Scalars("val/accuracy")) == 2  # after rollouts 1, 2
    # val/accuracy is the verifier's greedy accuracy on the 16 held-out prompts, here of the final (exported) policy
    held_out = AdditionTask(digits=2).make_examples(16, seed=1_000_003)  # PromptDataModule's val rows, seed 0
    (export,) = (tmp_path / "runs").glob("ppo_rm/*/hf_model")
    want = greedy_accuracy(str(export), AdditionTask(digits=2), held_out, max_new_tokens=8)
    assert events.Scalars("val/accuracy")[-1].value == pytest.approx(want, abs=1e-6)


# ------------------------------------------------------------------------------------------------ configs
def test_ppo_arithmetic_config_runs_two_steps(tmp_path, monkeypatch):
    monkeypatch.setattr("sys.argv", ["rlhf-lightning"])  # only `args` reach the CLI
    cli = cli_main(["fit", "--config", str(CONFIGS / "ppo_arithmetic.yaml"), "--trainer.max_steps", "2",
                    "--trainer.logger", "false", "--trainer.enable_checkpointing", "false",
                    "--trainer.enable_progress_bar", "false", "--trainer.limit_val_batches", "0",
                    "--trainer.default_root_dir", str(tmp_path), "--data.init_args.num_train", "128",
                    "--data.init_args.batch_size", "64"])  # the config's 256 prompts would exceed 128 rows
    assert isinstance(cli.model, PPOModule)
    assert cli.model.rollouts == 1  # max_steps=2 counts actor + critic steps: one rollout's worth is reached
    assert cli.trainer.global_step == 2 * cli.model.hparams.ppo_epochs * cli.model.hparams.minibatches
    assert (tmp_path / "hf_model" / "config.json").exists()


def test_ppo_hh_config_parses(capsys, monkeypatch):
    monkeypatch.setattr("sys.argv", ["rlhf-lightning"])
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["fit", "--config", str(CONFIGS / "ppo_hh.yaml"), "--print_config"])
    assert exit_info.value.code in (0, None)
    out = capsys.readouterr().out
    assert "trl-lib/Qwen2-0.5B-Reward" in out and "PPOModule" in out and "hh-rlhf-helpful-base" in out


def test_logged_metrics_cover_the_issue_list(tmp_path):
    m = PPOModule("tiny", reward_fns=[digit_fraction], ppo_epochs=1, max_new_tokens=3, kl_coef=0.05)
    trainer = make_trainer(tmp_path, max_steps=2)
    trainer.fit(m, make_data(batch_size=4))
    logged = set(trainer.callback_metrics)
    for key in ["reward/score", "reward/non_score", "policy/kl", "policy/kl_coef", "policy/loss", "value/loss",
                "policy/clip_frac_low", "policy/clip_frac_high", "value/clip_frac", "policy/approx_kl",
                "policy/entropy", "value/explained_variance", "value/mean", "value/return_mean",
                "rollout/completion_len_mean", "perf/tokens_per_s", "reward/digit_fraction"]:
        assert key in logged, key
    assert float(trainer.callback_metrics["policy/kl_coef"]) == pytest.approx(0.05)
    # the reward's KL part: -β x (sum of per-token KL), averaged over rows; 0 at the first rollout
    assert float(trainer.callback_metrics["reward/non_score"]) == 0.0


ROW_SCORES = [1.0, 3.0, -2.0, 0.5]


def row_scores(prompts, completions, **kwargs):
    return ROW_SCORES[:len(completions)]


@pytest.mark.parametrize("whiten", [False, True])
def test_whiten_rewards_scales_the_token_rewards_to_unit_std_keeping_the_mean(tmp_path, whiten):
    """kl_coef 0: the token rewards are the scores at each row's last real token. whiten_rewards divides them by
    their std over the rollout's real tokens and keeps their mean ("N+ details"), computed here by hand."""
    m = PPOModule("tiny", reward_fns=[row_scores], kl_coef=0.0, ppo_epochs=1, minibatches=1, max_new_tokens=4,
                  whiten_rewards=whiten)
    seen, gae_step = [], m.compute_advantages

    def recording(rewards, values, mask):
        seen.append((rewards.clone(), mask.clone()))
        return gae_step(rewards, values, mask)

    m.compute_advantages = recording
    make_trainer(tmp_path, max_steps=2).fit(m, make_data(batch_size=4))
    (rewards, mask), = seen
    raw = [[0.0] * mask.shape[1] for _ in range(4)]
    for i, row in enumerate(mask.tolist()):
        raw[i][max(t for t, on in enumerate(row) if on)] = ROW_SCORES[i]  # the score at the last real token
    real = [raw[i][t] for i in range(4) for t in range(mask.shape[1]) if mask[i, t]]
    n, mean = len(real), sum(real) / len(real)
    std = math.sqrt(sum((r - mean) ** 2 for r in real) / (n - 1) + 1e-8)
    expected = [[((r - mean) / std + mean if whiten else r) if mask[i, t] else 0.0 for t, r in enumerate(row)]
                for i, row in enumerate(raw)]
    torch.testing.assert_close(rewards, torch.tensor(expected), atol=1e-5, rtol=1e-5)
    if whiten:  # unit std and the same mean over the real tokens
        got = rewards[mask.bool()]
        assert got.std().item() == pytest.approx(1.0, abs=1e-4) and got.mean().item() == pytest.approx(mean, abs=1e-5)


@pytest.mark.parametrize("max_epochs, max_steps, rollouts", [
    (2, 1000, 4),  # the epochs end the run first: 2 epochs x 2 batches
    (10, 2 * 3 * 2, 3),  # max_steps (both optimizers' steps) ends it first: 3 rollouts of 2 updates each
])
def test_lr_reaches_its_floor_when_the_run_ends(tmp_path, max_epochs, max_steps, rollouts):
    m = PPOModule("tiny", reward_fns=[digit_fraction], lr=1e-3, critic_lr=2e-3, lr_schedule="cosine",
                  min_lr_ratio=0.1, ppo_epochs=2, minibatches=1, max_new_tokens=2, log_samples_every_n_steps=0)
    trainer = make_trainer(tmp_path, max_steps=max_steps, max_epochs=max_epochs)
    trainer.fit(m, make_data(batch_size=4, num_train=8))
    assert m.rollouts == rollouts and m.schedule_horizon() == m.optimizer_steps == 2 * rollouts
    actor, critic = m.optimizers()
    assert actor.param_groups[0]["lr"] == pytest.approx(1e-3 * 0.1)
    assert critic.param_groups[0]["lr"] == pytest.approx(2e-3 * 0.1)
