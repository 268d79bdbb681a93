"""The decline guard: held-out accuracy that stays clearly below its start is said once, with its likely causes."""

from __future__ import annotations

import math
import warnings
from types import SimpleNamespace

import pytest
import torch

from rlhf_lightning import GRPOModule, PPOModule
from rlhf_lightning.infra.decline import DeclineWatch


def test_watch_reports_once_after_patience_validations_below_the_start():
    watch = DeclineWatch(margin=0.05, patience=2)
    assert watch.update(0.52, start=True) is None  # the sanity check: the warm start
    assert watch.update(0.40) is None  # one validation below: could be noise
    assert watch.update(0.50) is None  # back within the margin: the count restarts
    assert watch.update(0.46) is None and watch.update(math.nan) is None
    assert watch.update(0.10) == (0.52, [0.46, 0.10])
    assert watch.update(0.05) is None  # said once
    resumed = DeclineWatch()
    resumed.load_state_dict(watch.state_dict())
    assert resumed.update(0.05, start=True) is None and resumed.start == 0.52  # its sanity check keeps the start
    assert resumed.warned and resumed.state_dict() == watch.state_dict()
    first = DeclineWatch()
    assert first.update(0.9) is None and first.update(0.8) is None  # no sanity check: the first validation starts it
    assert first.update(0.84) == (0.9, [0.8, 0.84])


def _validate(module, values):
    """Drive `on_validation_end` as the Trainer does: the sanity check's value, then each validation's."""
    caught = []
    for i, v in enumerate(values):
        module._trainer = SimpleNamespace(callback_metrics={"val/accuracy": torch.tensor(v)}, sanity_checking=i == 0)
        with warnings.catch_warnings(record=True) as got:
            warnings.simplefilter("always")
            module.on_validation_end()
        caught += [str(w.message) for w in got]
    module._trainer = None
    return caught


@pytest.mark.parametrize("cls, kl", [(GRPOModule, "beta=0.04"), (PPOModule, "kl_coef=0.05")])
def test_modules_warn_naming_the_causes(cls, kl):
    kwargs = dict(beta=0.04) if cls is GRPOModule else {}
    module = cls("tiny", reward_fns=["exact_match"], lr=5e-4, **kwargs)
    said = _validate(module, [0.83, 0.70, 0.65, 0.60])
    assert len(said) == 1, said
    assert said[0].startswith("val/accuracy fell from 0.830 at the start to 0.700, 0.650 in the last 2 validations")
    assert "lr=0.0005, lr_schedule=constant" in said[0] and kl in said[0] and "exploited" not in said[0]
    assert _validate(cls("tiny", reward_fns=["exact_match"], **kwargs), [0.83, 0.80, 0.85, 0.81]) == []


def test_learned_rewards_are_named_as_a_suspect():
    module = GRPOModule("tiny", reward_fns=["exact_match"])
    module.reward_funcs.append(SimpleNamespace(__name__="process_reward_model", learned=True))
    said = _validate(module, [0.5, 0.3, 0.2])
    assert len(said) == 1 and "the learned reward (process_reward_model) is being exploited" in said[0]


def test_a_real_fit_takes_the_start_from_the_sanity_check(tmp_path):
    import lightning as L

    from rlhf_lightning import PromptDataModule

    L.seed_everything(0)
    module = GRPOModule("tiny", group_size=2, max_new_tokens=4, log_samples_every_n_steps=0)
    data = PromptDataModule(task="addition", task_kwargs={"digits": 1}, num_train=8, num_val=4, batch_size=2,
                            val_batch_size=4)
    seen = []
    original = module.decline_watch.update
    module.decline_watch.update = lambda value, start=False: seen.append((start, value)) or original(value, start)
    L.Trainer(max_steps=2, val_check_interval=1, num_sanity_val_steps=1, limit_val_batches=1, logger=False,
              enable_checkpointing=False, enable_progress_bar=False, default_root_dir=tmp_path).fit(module, data)
    assert [s for s, _ in seen] == [True, False, False]  # the sanity check first: the warm start
    assert module.decline_watch.start == seen[0][1]
    checkpoint = {}
    module.on_save_checkpoint(checkpoint)
    again = GRPOModule("tiny", group_size=2, max_new_tokens=4, log_samples_every_n_steps=0)
    again.on_load_checkpoint(checkpoint)
    assert again.decline_watch.state_dict() == module.decline_watch.state_dict()
