"""DAPO completeness on the GRPO path: dynamic sampling by re-sampling, soft overlong punishment, entropy bonus."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import lightning as L
import pytest
import torch

from rlhf_lightning import GRPOModule, PromptDataModule
from rlhf_lightning.losses import aggregate, entropy_bonus, overlong_penalty
from rlhf_lightning.rollout import completion_logprobs, decode_completions


def first_char_is_digit(prompts, completions, **kwargs):
    """~10% at random init: most groups of 4 are all 0 (uninformative) on the first try."""
    return [1.0 if c[:1].isdigit() else 0.0 for c in completions]


def constant_reward(prompts, completions, **kwargs):
    """Every group is uninformative: the only learning signal left is the option under test."""
    return [1.0 for _ in completions]


def _trainer(tmp_path, steps, **kw):
    return L.Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, limit_val_batches=0, default_root_dir=tmp_path, **kw)


def _data(batch_size=4):
    return PromptDataModule(task="addition", task_kwargs={"digits": 2}, num_train=400, num_val=0,
                            batch_size=batch_size)


def _record_log_steps(module: GRPOModule) -> list[dict]:
    """Every rollout's (merged) rollout, rewards, uninformative groups and rollout metrics, as `log_step` sees them."""
    seen: list[dict] = []
    log_step = module.log_step

    def recording(step):
        seen.append(dict(rollout=step.rollout, rewards=step.scores.clone(), zero=step.uninformative.clone(),
                         metrics=dict(step.metrics), stats=dict(step.stats)))
        return log_step(step)

    module.log_step = recording
    return seen


# ---------------------------------------------------------------------------------------------- pure math
def test_overlong_penalty_hand_values():
    """DAPO eq. 13 with L_max = 10, L_cache = 4: 0 up to 6 tokens, -(|y| - 6) / 4 in the window, -1 beyond."""
    lengths = torch.tensor([3, 6, 7, 8, 9, 10, 12])
    expected = torch.tensor([0.0, 0.0, -0.25, -0.5, -0.75, -1.0, -1.0])
    torch.testing.assert_close(overlong_penalty(lengths, max_len=10, buffer_len=4), expected)
    torch.testing.assert_close(overlong_penalty(lengths, max_len=10, buffer_len=4, factor=0.5), expected / 2)
    assert (overlong_penalty(lengths, max_len=10, buffer_len=0) == 0).all()  # off
    with pytest.raises(ValueError, match="buffer_len"):
        overlong_penalty(lengths, max_len=10, buffer_len=11)


def test_entropy_bonus_value_and_gradient_by_hand():
    """Two tokens of a 2-word vocabulary, token-mean over 2 tokens. H = -Σ p log p and dH/dz_j = -p_j (log p_j + H),
    so the bonus -c * (H1 + H2) / 2 has gradient c/2 * p (log p + H): 0 at the uniform token, pushing the peaked
    token's logits together."""
    c = 0.3
    z = torch.tensor([[[0.0, 0.0], [math.log(3.0), 0.0]]], requires_grad=True)  # [1, 2, 2]: p = (.5,.5), (.75,.25)
    p = z.softmax(-1)
    entropy = -(p * p.log()).sum(-1)  # [1, 2]
    h2 = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    loss = entropy_bonus(entropy, torch.ones(1, 2), c, "token-mean")
    assert loss.item() == pytest.approx(-c * (math.log(2.0) + h2) / 2)
    loss.backward()
    grad_peaked = [c / 2 * q * (math.log(q) + h2) for q in (0.75, 0.25)]
    torch.testing.assert_close(z.grad, torch.tensor([[[0.0, 0.0], grad_peaked]]))
    zero = entropy_bonus(entropy.detach(), torch.ones(1, 2), 0.0, "token-mean")
    assert zero.item() == 0.0


# ---------------------------------------------------------------------------------------------- settings
@pytest.mark.parametrize("bad, message", [
    (dict(dynamic_sampling_max_tries=2), "dynamic_sampling_max_tries re-samples the groups drop_uninformative_groups"),
    (dict(dynamic_sampling_max_tries=-1, drop_uninformative_groups=True), "dynamic_sampling_max_tries must be"),
    (dict(overlong_buffer_len=40, max_new_tokens=32), r"overlong_buffer_len must be an integer in \[0, max_new"),
    (dict(overlong_buffer_len=4, overlong_penalty_factor=-1.0), "overlong_penalty_factor"),
    (dict(overlong_buffer_len=4, supervision="process"), "overlong_buffer_len penalises outcome rewards"),
    (dict(entropy_coef=-0.1), "entropy_coef must be finite and >= 0"),
])
def test_bad_dapo_settings_fail_before_loading(bad, message):
    with pytest.raises(ValueError, match=message):
        GRPOModule(model_name_or_path="tiny", **bad)


def test_cli_names_a_dapo_setting_that_would_be_ignored(tmp_path):
    """Through the console script, shipped config as shipped: re-sampling without dropping is one line, exit 2."""
    from conftest import run_script

    repo = Path(__file__).resolve().parents[1]
    out = run_script(["fit", "--config", str(repo / "configs" / "grpo_arithmetic.yaml"),
                      "--model.init_args.dynamic_sampling_max_tries", "2", "--trainer.max_steps", "1",
                      "--trainer.default_root_dir", str(tmp_path)], cwd=tmp_path)
    assert out.returncode == 2, out.stderr[-2000:]
    lines = [line for line in out.stderr.splitlines() if line.startswith("rlhf-lightning: error:")]
    assert len(lines) == 1 and "dynamic_sampling_max_tries re-samples the groups drop_uninformative_groups" in lines[0]


# ---------------------------------------------------------------------------------------------- dynamic sampling
def _dynamic_run(tmp_path, tries: int, steps: int = 2, seed: int = 0):
    L.seed_everything(seed)
    module = GRPOModule(model_name_or_path="tiny", reward_fns=[first_char_is_digit], group_size=4, beta=0.0,
                        max_new_tokens=4, drop_uninformative_groups=True, dynamic_sampling_max_tries=tries,
                        log_samples_every_n_steps=0)
    seen = _record_log_steps(module)
    _trainer(tmp_path, steps).fit(module, _data())
    return module, seen


def test_dynamic_sampling_resamples_until_every_group_is_informative(tmp_path):
    """Without re-sampling most groups of this reward are all-zero; with a bound that allows it, every group of the
    batch is informative, and the merged rollout stays consistent: each row's reward is that of its own completion,
    its completion decodes from its own tokens, and it belongs to its own prompt."""
    _, plain = _dynamic_run(tmp_path / "plain", tries=0)
    assert all(step["zero"].any() for step in plain)
    assert all(not step["metrics"] for step in plain)  # nothing logged when the option is off
    module, seen = _dynamic_run(tmp_path / "resampled", tries=40)
    assert module.optimizer_steps == 2  # re-sampling never changes the number of optimizer steps
    for step in seen:
        r, metrics = step["rollout"], step["metrics"]
        assert not step["zero"].any()
        assert metrics["rollout/informative_groups"].item() == 4 and metrics["rollout/resample_rounds"].item() >= 1
        assert step["rewards"].tolist() == first_char_is_digit(r.prompts, r.completions)
        s = r.samples
        assert decode_completions(module.tokenizer, s.completion_ids, s.completion_mask) == r.completions
        assert s.completion_ids.shape == s.completion_mask.shape and s.completion_ids.shape[0] == 16
        prompts = module.tokenizer.batch_decode(s.prompt_ids[::4], skip_special_tokens=True)
        assert [p.strip() for p in prompts] == [p.strip() for p in r.prompts[::4]]
        assert r.prompts == [p for p in r.prompts[::4] for _ in range(4)]


def test_dynamic_sampling_keeps_per_function_rewards_aligned_with_remax(tmp_path):
    """reward/<function> is logged from the merged rows (not the last round's), also when the rollout itself
    scores a greedy baseline (remax)."""
    L.seed_everything(0)
    module = GRPOModule(model_name_or_path="tiny", reward_fns=[first_char_is_digit], group_size=4, beta=0.0,
                        max_new_tokens=4, drop_uninformative_groups=True, dynamic_sampling_max_tries=40,
                        advantage_estimator="remax", log_samples_every_n_steps=0)
    per_fn = []
    log_step = module.log_step

    def recording(step):
        per_source = step.rollout.per_source  # the rollout's reward/<name> values, one reward function here
        per_fn.append((next(iter(per_source.values())).clone(), step.scores.clone(),
                       step.metrics["rollout/resample_rounds"]))
        return log_step(step)

    module.log_step = recording
    _trainer(tmp_path, 1).fit(module, _data())
    logged, rewards, rounds = per_fn[0]
    assert rounds >= 1 and logged.shape == rewards.shape and torch.equal(logged, rewards)


def test_dynamic_sampling_stops_at_its_bound(tmp_path):
    """A reward no re-sampling can make informative: exactly `dynamic_sampling_max_tries` rounds, then the groups
    stay (and are dropped from the loss)."""
    L.seed_everything(0)
    module = GRPOModule(model_name_or_path="tiny", reward_fns=[constant_reward], group_size=2, beta=0.0,
                        max_new_tokens=3, drop_uninformative_groups=True, dynamic_sampling_max_tries=3,
                        log_samples_every_n_steps=0)
    seen = _record_log_steps(module)
    _trainer(tmp_path, 1).fit(module, _data(batch_size=2))
    assert seen[0]["metrics"]["rollout/resample_rounds"].item() == 3
    assert seen[0]["metrics"]["rollout/informative_groups"].item() == 0


def test_dynamic_sampling_is_seeded(tmp_path):
    """The same seed re-samples the same completions (the re-samples come from the seeded sampling generator)."""
    _, a = _dynamic_run(tmp_path / "a", tries=40)
    _, b = _dynamic_run(tmp_path / "b", tries=40)
    assert [s["rollout"].completions for s in a] == [s["rollout"].completions for s in b]


@pytest.mark.slow
def test_dynamic_sampling_resumes_exactly(tmp_path):
    """Resuming from the step-1 checkpoint of a 3-rollout run ends on the same weights: the re-sampling draws
    continue from the checkpointed sampling generator."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    def run(ckpt_path=None):
        L.seed_everything(0 if ckpt_path is None else 123)  # resumed: only checkpointed RNG states can make it exact
        module = GRPOModule(model_name_or_path="tiny", reward_fns=[first_char_is_digit], group_size=4, beta=0.0,
                            max_new_tokens=4, drop_uninformative_groups=True, dynamic_sampling_max_tries=40,
                            log_samples_every_n_steps=0)
        seen = _record_log_steps(module)
        saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_top_k=-1,
                                filename="{step}")
        trainer = L.Trainer(max_steps=3, logger=False, callbacks=[saver], enable_progress_bar=False,
                            enable_model_summary=False, limit_val_batches=0, default_root_dir=tmp_path)
        trainer.fit(module, _data(), ckpt_path=ckpt_path)
        return module, seen

    straight, seen = run()
    assert all(step["metrics"]["rollout/resample_rounds"] >= 1 for step in seen)
    resumed, _ = run(tmp_path / "ckpt" / "step=1.ckpt")
    for (name, a), b in zip(straight.policy.named_parameters(), resumed.policy.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=name)


DDP_DYNAMIC = """
import json, sys, torch, lightning as L
from rlhf_lightning import GRPOModule, PromptDataModule
torch.set_num_threads(1)

def first_char_is_digit(prompts, completions, **kwargs):
    return [1.0 if c[:1].isdigit() else 0.0 for c in completions]

class Recording(GRPOModule):
    def log_step(self, step):
        with open(f"{sys.argv[1]}/rank_{self.global_rank}.jsonl", "a") as f:
            f.write(json.dumps([int(step.metrics["rollout/resample_rounds"]),
                                int(step.metrics["rollout/informative_groups"]), self.optimizer_steps]) + "\\n")
        return super().log_step(step)

m = Recording("tiny", reward_fns=[first_char_is_digit], group_size=4, beta=0.0, max_new_tokens=4,
              drop_uninformative_groups=True, dynamic_sampling_max_tries=int(sys.argv[2]), log_samples_every_n_steps=0)
trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=2, logger=False,
                    enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                    default_root_dir=sys.argv[1], limit_val_batches=0)
trainer.fit(m, PromptDataModule(task="addition", num_train=64, num_val=0, batch_size=4))
"""


@pytest.mark.slow
def test_dynamic_sampling_under_ddp_each_rank_resamples_its_own_and_steps_together(tmp_path):
    """2 gloo processes: each rank re-samples its own groups, none waits on the other, and both take the same
    optimizer steps."""
    import json

    from conftest import run_script_processes

    run_script_processes(tmp_path, DDP_DYNAMIC, str(tmp_path), "40")
    ranks = [[json.loads(line) for line in (tmp_path / f"rank_{r}.jsonl").read_text().splitlines()] for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 2
    assert [row[2] for row in ranks[0]] == [row[2] for row in ranks[1]] == [1, 2]  # same optimizer steps
    assert all(row[1] == 4 for rows in ranks for row in rows)  # every rank's batch: 4 informative groups
    assert all(row[0] >= 1 for rows in ranks for row in rows)  # each of them had to re-sample to get there


@pytest.mark.slow
def test_dynamic_sampling_under_fsdp2_finishes(tmp_path):
    """FSDP2 all-gathers the weights in every sampling call: ranks re-sampling different numbers of rounds would
    wait on each other forever. The shipped config + configs/fsdp.yaml on 2 processes, re-sampling on, ends and
    exports (the ranks go round together)."""
    from conftest import run_cli_processes
    from test_scaling import SMALL, TASKS

    root = run_cli_processes(tmp_path, "fsdp", [*TASKS["grpo"], "--config", "configs/fsdp.yaml",
                                                "--trainer.devices", "2", *SMALL,
                                                "--model.init_args.drop_uninformative_groups", "true",
                                                "--model.init_args.dynamic_sampling_max_tries", "40"])
    assert (root / "hf_model" / "config.json").exists()


# ---------------------------------------------------------------------------------------------- overlong penalty
def test_overlong_penalty_is_added_to_the_reward_and_shortens_completions(tmp_path):
    """A constant task reward leaves only the length penalty to learn from: each row's reward is 1 + eq. 13 of its
    own length, reward/overlong_penalty is their mean, and a few steps make completions shorter."""
    L.seed_everything(0)
    module = GRPOModule(model_name_or_path="tiny", reward_fns=[constant_reward], group_size=4, beta=0.0,
                        max_new_tokens=8, overlong_buffer_len=6, lr=3e-3, log_samples_every_n_steps=0)
    seen = _record_log_steps(module)
    _trainer(tmp_path, 12).fit(module, _data())
    for step in seen:
        lengths = step["rollout"].samples.completion_lengths()
        penalty = overlong_penalty(lengths, 8, 6)
        torch.testing.assert_close(step["rewards"].cpu(), 1.0 + penalty)
        assert step["metrics"]["reward/overlong_penalty"].item() == pytest.approx(penalty.mean().item())
    mean_len = [float(s["rollout"].samples.completion_lengths().float().mean()) for s in seen]
    assert sum(mean_len[-3:]) / 3 < sum(mean_len[:3]) / 3 - 1.0, mean_len


# ---------------------------------------------------------------------------------------------- entropy bonus
def _entropy_run(tmp_path, coef: float, steps: int = 1, reward=constant_reward):
    """Constant reward and beta = 0: the surrogate's gradient is exactly 0, so the entropy bonus is all there is."""
    L.seed_everything(0)
    module = GRPOModule(model_name_or_path="tiny", reward_fns=[reward], group_size=4, beta=0.0,
                        max_new_tokens=6, max_grad_norm=None, entropy_coef=coef, lr=1e-2,
                        log_samples_every_n_steps=0)
    initial = copy.deepcopy(module.policy)
    rollouts, grads = [], []
    rollout = module.rollout

    def recording_rollout(batch):
        rollouts.append(rollout(batch))
        return rollouts[-1]

    class Capture(L.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            grads.append({n: p.grad.detach().clone() for n, p in pl_module.policy.named_parameters()
                          if p.grad is not None})

    module.rollout = recording_rollout
    seen = _record_log_steps(module)
    _trainer(tmp_path, steps, callbacks=[Capture()]).fit(module, _data())
    return initial, rollouts, grads, seen


def test_entropy_bonus_gradient_is_minus_coef_times_the_entropy_gradient(tmp_path):
    """The first step's gradient equals ∇[-c * aggregate(H)] over the rollout, computed here on the initial
    policy with the step's own normaliser (rows with a token: seq-mean-token-mean); entropy_coef = 0 gives none."""
    c = 0.5
    _, _, grads_off, _ = _entropy_run(tmp_path / "off", 0.0)
    assert all(g.abs().max() == 0 for g in grads_off[0].values())
    initial, rollouts, grads_on, _ = _entropy_run(tmp_path / "on", c)
    s = rollouts[0].samples
    initial.train()
    _, entropy = completion_logprobs(initial, s.prompt_ids, s.prompt_mask, s.completion_ids, s.completion_mask,
                                     return_entropy=True)
    normalizer = (s.completion_mask.sum(-1) > 0).sum()
    (-c * aggregate(entropy, s.completion_mask, "seq-mean-token-mean", normalizer=normalizer)).backward()
    expected = {n: p.grad for n, p in initial.named_parameters() if p.grad is not None}
    assert expected and any(g.abs().max() > 0 for g in expected.values())
    for name, g in expected.items():
        torch.testing.assert_close(grads_on[0][name], g, atol=1e-6, rtol=1e-4, msg=name)


def test_entropy_bonus_keeps_the_policy_entropy_up(tmp_path):
    """Learning to start with a digit makes the policy peaked (its entropy falls); the bonus holds it up."""
    _, _, _, off = _entropy_run(tmp_path / "off", 0.0, steps=8, reward=first_char_is_digit)
    _, _, _, on = _entropy_run(tmp_path / "on", 1.0, steps=8, reward=first_char_is_digit)
    off_h, on_h = [s["stats"]["policy/entropy"] for s in off], [s["stats"]["policy/entropy"] for s in on]
    assert off_h[-1] < off_h[0] and on_h[-1] > off_h[-1] + 0.1, (off_h, on_h)


def test_merge_rollouts_puts_each_new_group_in_its_old_place_by_hand():
    """Groups of 2; group 1 of a 3-group rollout is replaced by group 0 of a re-sample with longer completions
    and a longer prompt: the rows move together, completions are right-padded, prompts left-padded."""
    from rlhf_lightning.algorithms import dynamic_sampling as ds
    from rlhf_lightning.rollout import Rollout, RolloutBatch

    def rollout(n, p_len, t_len, tag):
        samples = RolloutBatch(prompt_ids=torch.full((n, p_len), tag), prompt_mask=torch.ones(n, p_len),
                               completion_ids=torch.full((n, t_len), tag), completion_mask=torch.ones(n, t_len),
                               logprobs=None, is_truncated=torch.zeros(n, dtype=torch.bool))
        names = [f"{tag}{i}" for i in range(n)]
        return Rollout(samples, names, names, {"answer": names})

    old, new = rollout(6, 2, 1, 7), rollout(2, 3, 2, 9)
    rows = ds.replacement_rows(6, 2, torch.tensor([1]), torch.tensor([0]))
    assert rows.tolist() == [0, 1, 6, 7, 4, 5]
    merged = ds.merge_rollouts(old, new, rows, pad_token_id=0)
    assert merged.completions == ["70", "71", "90", "91", "74", "75"] == merged.columns["answer"]
    s = merged.samples
    assert s.completion_ids.tolist() == [[7, 0], [7, 0], [9, 9], [9, 9], [7, 0], [7, 0]]
    assert s.completion_mask.tolist() == [[1, 0], [1, 0], [1, 1], [1, 1], [1, 0], [1, 0]]
    assert s.prompt_ids[0].tolist() == [0, 7, 7] and s.prompt_mask[0].tolist() == [0, 1, 1]
    assert s.prompt_ids[2].tolist() == [9, 9, 9] and s.logprobs is None
    rewards = ds.select_rows(ds.cat_rows(torch.arange(6.0), torch.tensor([10.0, 11.0])), rows)
    assert rewards.tolist() == [0.0, 1.0, 10.0, 11.0, 4.0, 5.0]
