"""Scaling through Lightning strategies: FSDP2 / DDP on 2 CPU processes, precision, LoRA, gradient checkpointing."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import DIGIT_REWARD, REPO, SCRIPT, run_cli_processes, run_processes, subprocess_env

from rlhf_lightning import GRPOModule, PPOModule, PreferenceDataModule, PromptDataModule, RewardModel, SFTModule
from rlhf_lightning.cli import cli_main
from rlhf_lightning.infra.parallel import FSDP2Strategy, check_strategy
from rlhf_lightning.models import load_causal_lm
from rlhf_lightning.modules.process_reward_model import ProcessRewardModel

# Shrink a task config to a few rollouts (the same overrides for every strategy).
SMALL = ["--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "1", "--trainer.logger", "false",
         "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
         "--data.init_args.batch_size", "4", "--data.init_args.num_train", "64", "--data.init_args.num_val", "8",
         "--data.init_args.val_batch_size", "4", "--model.init_args.lr", "1e-3",
         "--model.init_args.reward_fns", "[digit_reward.digit_reward]"]
TASKS = {
    # 2 rollouts x 2 minibatches = 4 optimizer steps
    "grpo": ["--config", "configs/grpo_arithmetic.yaml", "--trainer.max_steps", "4",
             "--model.init_args.group_size", "4", "--model.init_args.minibatches", "2"],
    # 2 rollouts x 2 minibatches x 2 optimizers (actor, critic) = 8 steps
    "ppo": ["--config", "configs/ppo_arithmetic.yaml", "--trainer.max_steps", "8",
            "--model.init_args.max_new_tokens", "4"],
}
# LoRA adds randomly initialised weights: FSDP2 must start every rank from the same ones (as DDP does)
# the shared critic's value head is called outside the policy's forward: it is an FSDP2 unit of its own
TASKS["ppo-shared"] = [*TASKS["ppo"], "--model.init_args.critic", "shared"]
TASKS["grpo-lora"] = [*TASKS["grpo"], "--model.init_args.lora", "{r: 4, alpha: 8, target_modules: [q_proj, v_proj]}"]
# PPO's reward model (frozen, its backbone sharded, its head called outside it) scores the same under FSDP2
TASKS["ppo-rm"] = TASKS["ppo"]


def reward_model_args(task: str, tmp_path: Path) -> list[str]:
    """For `ppo-rm`: a tiny reward model export (weights + tokenizer) and the flag that uses it."""
    if task != "ppo-rm":
        return []
    from rlhf_lightning.models import load_sequence_classifier
    from rlhf_lightning.tokenizer import build_char_tokenizer

    out, tok = tmp_path / "rm", build_char_tokenizer()
    load_sequence_classifier("tiny", tok, seed=7).save_pretrained(out)
    tok.save_pretrained(out)
    return ["--model.init_args.reward_model", str(out)]


def load_weights(model_dir: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir).state_dict()


@pytest.mark.slow
@pytest.mark.parametrize("task", ["grpo", "ppo", "ppo-shared", "grpo-lora", "ppo-rm"])
def test_fsdp2_and_ddp_on_two_cpu_processes_train_to_the_same_weights(tmp_path, task):
    """The README's command (task config + configs/fsdp.yaml + 2 devices) and the same run under DDP.

    Same seeds, same data split, so sharding must not change the maths: both exports agree to float rounding,
    both moved away from the initial weights, and FSDP2 wrote a distributed checkpoint (one shard per rank).
    """
    rm = reward_model_args(task, tmp_path)
    fsdp = run_cli_processes(tmp_path, "fsdp", [*TASKS[task], "--config", "configs/fsdp.yaml",
                                                "--trainer.devices", "2", *SMALL, *rm])
    ddp = run_cli_processes(tmp_path, "ddp", [*TASKS[task], "--trainer.strategy", "ddp", "--trainer.devices", "2",
                                              "--trainer.accelerator", "cpu", *SMALL, *rm])
    a, b = load_weights(fsdp / "hf_model"), load_weights(ddp / "hf_model")
    init = load_causal_lm("tiny", seed=0).state_dict()
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)
    assert max(float((a[k] - init[k]).abs().max()) for k in a) > 1e-4  # it trained
    shards = sorted(p.name for p in (fsdp / "checkpoints").glob("*.ckpt/*.distcp"))
    assert len(shards) == 2, shards
    # both checkpoints keep each rank's own sampling stream (rank 0 writes them)
    for meta in [*fsdp.glob("checkpoints/*.ckpt/meta.pt"), *ddp.glob("checkpoints/*.ckpt")]:
        states = torch.load(meta, weights_only=False)["sample_generator_states"]
        assert len(states) == 2 and not torch.equal(states[0], states[1]), meta


@pytest.mark.slow
def test_fsdp2_run_resumes_from_its_distributed_checkpoint(tmp_path):
    first = run_cli_processes(tmp_path, "first", [*TASKS["grpo"], "--config", "configs/fsdp.yaml", *SMALL])
    (ckpt,) = (first / "checkpoints").glob("*.ckpt")
    resumed = run_cli_processes(tmp_path, "resumed", [*TASKS["grpo"], "--config", "configs/fsdp.yaml", *SMALL,
                                                      "--trainer.max_steps", "8", "--ckpt_path", str(ckpt)])
    (last,) = (resumed / "checkpoints").glob("*.ckpt")
    meta = torch.load(last / "meta.pt", weights_only=False)
    assert meta["rlhf_counters"] == {"optimizer_steps": 8, "rollouts": 4, "skipped_steps": 0}  # 2 more on top of 2
    a, b = load_weights(first / "hf_model"), load_weights(resumed / "hf_model")
    assert any(not torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
@pytest.mark.parametrize("task", ["sft", "rm", "rm-lora"])
def test_sft_and_reward_model_train_under_fsdp2_and_export_full_weights(tmp_path, task):
    """The automatically optimized modules under the same layer config; the export gathers the shards (with LoRA:
    the gathered adapter and head merged into a plain classifier)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    common = ["--trainer.max_steps", "3", "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
              "--trainer.limit_val_batches", "1", "--data.init_args.num_train", "64", "--data.init_args.num_val",
              "8", "--data.init_args.batch_size", "8", "--data.init_args.val_batch_size", "8",
              "--model.init_args.warmup_steps", "0", "--config", "configs/fsdp.yaml", "--trainer.devices", "2"]
    if task == "sft":
        root = run_cli_processes(tmp_path, task, ["--config", "configs/sft_arithmetic.yaml", *common,
                                                  "--trainer.val_check_interval", "3"])
        got = AutoModelForCausalLM.from_pretrained(root / "hf_model").state_dict()
        init = load_causal_lm("tiny", seed=0).state_dict()
    else:
        from rlhf_lightning.models import load_sequence_classifier

        lora = ["--model.init_args.lora", "{r: 4, alpha: 8}"] if task == "rm-lora" else []
        # from the tiny preset with random wrong sums: the shipped config's SFT export and `policy` negatives
        # are not what this checks
        root = run_cli_processes(tmp_path, task, ["--config", "configs/rm_arithmetic.yaml", *common,
                                                  "--model.init_args.model_name_or_path", "tiny",
                                                  "--data.init_args.negatives", "{random: 1.0}",
                                                  "--data.init_args.negatives_model", "null", *lora])
        got = AutoModelForSequenceClassification.from_pretrained(root / "hf_model").state_dict()
        init = load_sequence_classifier("tiny", seed=0).state_dict()
    assert got.keys() == init.keys()
    assert all(torch.isfinite(v).all() for v in got.values())
    assert max(float((got[k] - init[k]).abs().max()) for k in got) > 1e-3  # trained, and the full tensors came back


# the README's scaling commands (task config + layer), with the CLI's default TensorBoard logger left ON
GRPO_CONFIG, RM_CONFIG, FSDP_LAYER = (str(REPO / "configs" / f) for f in ("grpo_arithmetic.yaml", "rm_arithmetic.yaml",
                                                                          "fsdp.yaml"))
README_SCALING = {
    "grpo-fsdp2": ["--config", GRPO_CONFIG, "--config", FSDP_LAYER, "--trainer.devices", "2"],
    "grpo-ddp": ["--config", GRPO_CONFIG, "--trainer.strategy", "ddp", "--trainer.devices", "2"],
    "rm-ddp": ["--config", RM_CONFIG, "--trainer.strategy", "ddp", "--trainer.devices", "2"],
}
SHRINK = {  # a few steps; one validation batch
    "grpo": ["--trainer.max_steps", "2", "--trainer.val_check_interval", "2", "--model.init_args.group_size", "4",
             "--model.init_args.reward_fns", "[digit_reward.digit_reward]", "--data.init_args.batch_size", "4"],
    # rm_arithmetic.yaml starts from the SFT export and its mistakes; this test is about the end of fit, so the
    # RM starts from the tiny preset with random wrong sums (no SFT stage first)
    "rm": ["--trainer.max_steps", "2", "--trainer.max_epochs", "1", "--data.init_args.batch_size", "8",
           "--model.init_args.model_name_or_path", "tiny", "--data.init_args.negatives", "{random: 1.0}",
           "--data.init_args.negatives_model", "null"],
}


@pytest.mark.slow
@pytest.mark.parametrize("command", list(README_SCALING))
def test_readme_scaling_commands_with_the_default_logger_exit_0_and_export(tmp_path, command):
    """Through the console script with the logger on, as users run them: the run dir (`trainer.log_dir`) is a
    collective under DDP / FSDP2, and reading it on rank 0 only at the end of fit crashed the run ("Connection
    closed by peer") before `hf_model/` was written."""
    (tmp_path / "digit_reward.py").write_text(DIGIT_REWARD)
    root = tmp_path / "out"
    task = command.split("-")[0]
    args = [*README_SCALING[command], *SHRINK[task], "--trainer.accelerator", "cpu",
            "--trainer.limit_val_batches", "1", "--data.init_args.num_train", "64", "--data.init_args.num_val", "8",
            "--data.init_args.val_batch_size", "4", "--trainer.enable_progress_bar", "false",
            "--trainer.default_root_dir", str(root)]
    run_processes([str(SCRIPT), "fit", *args], tmp_path, tmp_path)
    name = {"grpo": "grpo_arithmetic", "rm": "rm_arithmetic"}[task]
    run = root / "runs" / name / "version_0"
    assert (run / "hf_model" / "config.json").exists(), sorted(str(p.relative_to(root)) for p in root.rglob("*"))
    assert list(run.glob("events.out.tfevents.*"))  # rank 0 logged; no other rank opened a second version
    assert sorted(p.name for p in (root / "runs" / name).iterdir()) == ["version_0"]


PARITY_LABEL = "def parity(prompts, completions, **kwargs):\n" \
               "    return [float(ord(c[0]) % 2) if c else 0.0 for c in completions]\n"


@pytest.mark.slow
@pytest.mark.parametrize("config", ["grpo_iterative", "grpo_iterative_prm"])
def test_iterative_rl_under_ddp_with_the_default_logger_exports_policy_and_reward_model(tmp_path, config):
    """The iterative callbacks' end-of-fit export reads the run dir (a collective) on every rank too; the rows
    (pairs, MC-labelled stepwise rows) are all-gathered and the iteration's metrics reduced on both ranks."""
    (tmp_path / "parity_label.py").write_text(PARITY_LABEL)
    if config == "grpo_iterative":
        RewardModel("tiny").export(tmp_path / "rm")
        model = ["--model.init_args.reward_model", str(tmp_path / "rm"), "--trainer.callbacks.init_args.labeler",
                 "parity_label.parity"]
    else:
        ProcessRewardModel("tiny").export(tmp_path / "rm")
        model = ["--model.init_args.process_reward_model", str(tmp_path / "rm"), "--model.init_args.model_name_or_path",
                 "tiny", "--trainer.callbacks.init_args.num_rollouts", "2"]
    root = tmp_path / "out"
    args = ["--config", str(REPO / "configs" / f"{config}.yaml"), "--trainer.strategy", "ddp",
            "--trainer.devices", "2", "--trainer.accelerator", "cpu", "--trainer.max_steps", "2",
            "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "1",
            "--trainer.enable_progress_bar", "false", *model,
            "--model.init_args.group_size", "2", "--model.init_args.max_new_tokens", "4",
            "--trainer.callbacks.init_args.every_n_steps", "1", "--trainer.callbacks.init_args.samples_per_iteration",
            "16", "--data.init_args.batch_size", "4",
            "--data.init_args.num_train", "64", "--data.init_args.num_val", "8", "--data.init_args.val_batch_size",
            "4", "--trainer.default_root_dir", str(root)]
    run_processes([str(SCRIPT), "fit", *args], tmp_path, tmp_path)
    run = root / "runs" / config / "version_0"
    export = "reward_model" if config == "grpo_iterative" else "process_reward_model"
    assert (run / "hf_model" / "config.json").exists() and (run / export / "config.json").exists()


# ------------------------------------------------------------------------------------------- strategy misuse
def test_fsdp_strategy_with_manual_optimization_fails_at_start_naming_fsdp2(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["rlhf-lightning"])
    with pytest.raises(SystemExit) as exit_info:  # a user error: one line on stderr, exit status 2, no traceback
        cli_main(["fit", "--config", str(REPO / "configs/grpo_arithmetic.yaml"), "--trainer.strategy", "fsdp"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert re.search(r"GRPOModule uses manual optimization.*FSDP2Strategy.*configs/fsdp.yaml", err), err


def test_check_strategy_refuses_fsdp1_only_for_manual_optimization():
    from lightning.pytorch.strategies import FSDPStrategy

    with pytest.raises(ValueError, match="PPOModule uses manual optimization"):
        check_strategy(PPOModule("tiny", reward_fns=["exact_match"]), FSDPStrategy())
    check_strategy(SFTModule("tiny"), FSDPStrategy())  # automatic optimization: Lightning's FSDP is fine
    check_strategy(GRPOModule("tiny", beta=0.0), FSDP2Strategy())


def test_fsdp2_strategy_rejects_a_bad_tensor_parallel_size():
    with pytest.raises(ValueError, match="tensor_parallel_size must be an integer >= 1"):
        FSDP2Strategy(tensor_parallel_size=0)


# -------------------------------------------------------------------------------------------------- precision
def digit_reward(prompts, completions, **kwargs):
    return [float(c[:1].isdigit()) for c in completions]


def _trainer(tmp_path, steps: int, **kw) -> L.Trainer:
    return L.Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
                     default_root_dir=tmp_path, accelerator="cpu", devices=1, **kw)


def _prompts(**kw) -> PromptDataModule:
    return PromptDataModule(task="addition", num_train=64, num_val=0, batch_size=4, **kw)


def _module_and_data(name: str):
    if name == "sft":
        return SFTModule("tiny"), _prompts(completion_column="completion"), 2
    if name == "grpo":
        return GRPOModule("tiny", reward_fns=[digit_reward], group_size=4, max_new_tokens=4, lr=1e-3), _prompts(), 2
    if name == "ppo":
        return PPOModule("tiny", reward_fns=[digit_reward], ppo_epochs=1, max_new_tokens=4, lr=1e-3), _prompts(), 4
    return RewardModel("tiny"), PreferenceDataModule(task="addition", num_train=32, num_val=0, batch_size=4), 2


@pytest.mark.parametrize("precision", ["bf16-true", "bf16-mixed"])
@pytest.mark.parametrize("name", ["sft", "grpo", "ppo", "rm"])
def test_every_module_trains_in_bf16_and_stays_finite(tmp_path, name, precision):
    module, data, steps = _module_and_data(name)
    before = {k: v.detach().clone() for k, v in module.named_parameters()}
    trainer = _trainer(tmp_path, steps, precision=precision)
    trainer.fit(module, data)
    losses = {k: float(v) for k, v in trainer.callback_metrics.items() if k.endswith("loss")}
    assert losses and all(torch.isfinite(torch.tensor(v)) for v in losses.values()), losses
    params = dict(module.named_parameters())
    assert all(torch.isfinite(p).all() for p in params.values())
    expected = torch.bfloat16 if precision == "bf16-true" else torch.float32  # mixed keeps fp32 master weights
    assert {p.dtype for p in params.values()} == {expected}
    assert any(not torch.equal(before[k].to(p.dtype), p.detach()) for k, p in params.items())  # it trained


# ------------------------------------------------------------------------------------------------------- LoRA
LORA = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}


def test_lora_reference_is_the_base_model_with_the_adapter_disabled(tmp_path):
    from rlhf_lightning.rollout import completion_logprobs, sample

    m = GRPOModule("tiny", reward_fns=[digit_reward], group_size=4, max_new_tokens=4, lr=1e-2, beta=0.1, lora=LORA)
    assert m.ref_policy is None and not any("ref_policy" in n for n, _ in m.named_modules())  # no second copy
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    _trainer(tmp_path, 3).fit(m, _prompts())
    base = load_causal_lm("tiny", seed=0).eval()
    batch = next(iter(_prompts_loader()))
    s = sample(m.policy, batch["prompt_ids"], batch["prompt_mask"], max_new_tokens=4, eos_token_id=1,
               pad_token_id=0)
    ctx = dict(prompt_ids=s.prompt_ids, prompt_mask=s.prompt_mask, completion_ids=s.completion_ids,
               completion_mask=s.completion_mask)
    with torch.no_grad(), m.reference_policy() as ref:
        ref_logp = completion_logprobs(ref.eval(), **ctx)
        base_logp = completion_logprobs(base, **ctx)
    with torch.no_grad():
        policy_logp = completion_logprobs(m.policy, **ctx)
    torch.testing.assert_close(ref_logp, base_logp)
    assert not torch.allclose(policy_logp, base_logp)  # the adapter trained and is active outside the context


def _prompts_loader():
    dm = _prompts(tokenizer="tiny")
    dm.setup("fit")
    return dm.train_dataloader()


@pytest.mark.parametrize("export", ["merged", "adapter"])
def test_lora_run_exports_a_model_that_reloads_with_the_trained_behaviour(tmp_path, export):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    m = SFTModule("tiny", lr=1e-2, lora=LORA, lora_export=export)
    _trainer(tmp_path, 3).fit(m, _prompts(completion_column="completion"))
    out = tmp_path / "hf_model"
    ids = torch.tensor([[10, 20, 30, 40]])
    with torch.no_grad():
        expected = m.policy.eval()(input_ids=ids).logits
    if export == "merged":
        assert not (out / "adapter_config.json").exists()
        reloaded = AutoModelForCausalLM.from_pretrained(out)
    else:
        assert (out / "adapter_config.json").exists() and not (out / "model.safetensors").exists()
        reloaded = PeftModel.from_pretrained(load_causal_lm("tiny", seed=0), out)
    with torch.no_grad():
        got = reloaded.eval()(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_lora_adapter_export_of_a_local_base_loads_from_another_folder(tmp_path, monkeypatch):
    """A base given as a relative folder is recorded by absolute path, so peft finds it from any working
    directory (a relative `base_model_name_or_path` resolves against the loader's cwd and fails)."""
    import json

    from peft import AutoPeftModelForCausalLM

    (tmp_path / "project").mkdir()
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "project")
    load_causal_lm("tiny", seed=0).save_pretrained("base")
    SFTModule("tiny").tokenizer.save_pretrained("base")
    m = SFTModule("base", lr=1e-2, lora=LORA, lora_export="adapter")
    _trainer(tmp_path / "project" / "run", 2).fit(m, _prompts(completion_column="completion"))
    out = tmp_path / "project" / "run" / "hf_model"
    base = json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert base == str(tmp_path / "project" / "base")
    monkeypatch.chdir(tmp_path / "elsewhere")
    reloaded = AutoPeftModelForCausalLM.from_pretrained(out)
    ids = torch.tensor([[10, 20, 30, 40]])
    with torch.no_grad():
        torch.testing.assert_close(reloaded.eval()(input_ids=ids).logits, m.policy.eval()(input_ids=ids).logits,
                                   rtol=1e-4, atol=1e-5)


def test_lora_ppo_critic_has_no_adapter_and_trains(tmp_path):
    m = PPOModule("tiny", reward_fns=[digit_reward], ppo_epochs=1, max_new_tokens=4, lr=1e-3, lora=LORA)
    assert m.ref_policy is None
    assert not any("lora_" in n for n, _ in m.value_model.named_parameters())
    assert all(p.requires_grad for p in m.value_model.parameters())
    _trainer(tmp_path, 4).fit(m, _prompts())
    assert m.rollouts == 2


def test_iterative_reference_reset_is_refused_with_lora(tmp_path):
    from rlhf_lightning import IterativeRewardModelCallback

    m = GRPOModule("tiny", reward_fns=[digit_reward], group_size=4, max_new_tokens=4, beta=0.1, lora=LORA)
    with pytest.raises(ValueError, match="reset_reference needs a reference copy.*LoRA"):
        _trainer(tmp_path, 2, callbacks=[IterativeRewardModelCallback("exact_match")]).fit(m, _prompts())


@pytest.mark.parametrize("bad, message", [
    ({"rank": 4}, "lora has unknown keys"), ({"r": 0}, "lora.r must be"), ({"dropout": 1.0}, "lora.dropout"),
])
def test_bad_lora_settings_raise_one_line(bad, message):
    with pytest.raises(ValueError, match=message):
        GRPOModule("tiny", lora=bad)


def test_bad_lora_export_is_refused():
    with pytest.raises(ValueError, match="lora_export must be merged|adapter"):
        SFTModule("tiny", lora=LORA, lora_export="both")


# --------------------------------------------------------------------------------------- gradient checkpointing
def test_gradient_checkpointing_gives_the_same_gradient():
    dm = _prompts(completion_column="completion", tokenizer="tiny")
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    grads = []
    for ckpt in (False, True):
        m = SFTModule("tiny", gradient_checkpointing=ckpt)
        assert m.policy.is_gradient_checkpointing == ckpt
        m.sft_loss(batch).backward()
        grads.append(torch.cat([p.grad.flatten() for p in m.policy.parameters()]))
    torch.testing.assert_close(grads[0], grads[1])


def test_the_process_group_is_destroyed_at_exit_while_python_is_alive(tmp_path):
    """`parallel.destroy_process_group_at_exit` (every module's setup): the group is gone before interpreter
    finalization, where gloo's threads would otherwise abort the finished process now and then (exit -6)."""
    script = f"""
import atexit, torch.distributed as dist
from rlhf_lightning.infra import parallel
atexit.register(lambda: print("initialized at exit:", dist.is_initialized()))  # runs after the handler below
dist.init_process_group("gloo", init_method="file://{tmp_path / 'store'}", rank=0, world_size=1)
parallel.destroy_process_group_at_exit()
parallel.destroy_process_group_at_exit()  # once
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                         env=subprocess_env(REPO), check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "initialized at exit: False"
