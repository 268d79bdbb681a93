"""Loading policies, critics and reward models: a preset name, a local directory or a hub id, one code path.

Presets build a small Llama-style decoder from a config (random init, seeded), sized for the offline default's
character tokenizer. Llama, not Qwen2: transformers 5 maps every `model_type: qwen2` directory to `Qwen2Tokenizer`
whatever its tokenizer_config says, and that byte-level tokenizer drops the char vocabulary's spaces and newlines,
so an export (model + char tokenizer in one folder) would not reload through `AutoTokenizer`. A `llama` directory
keeps the saved `TokenizersBackend`. (Qwen2 differs only by q/k/v biases.)
A local directory is anything written by `save_pretrained`. Anything else is treated as a hub id and handed to
`from_pretrained` (which needs the network the first time).

Safety: `trust_remote_code` is off unless the caller turns it on, and transformers loads safetensors first
(and `torch.load(weights_only=True)` for legacy `.bin` files).
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .infra.paths import looks_like_path

# Llama-style decoders built from scratch. `small` is the benchmark's model (hidden 256, 4 layers);
# `medium` is the ~100M-parameter one (hidden 768, 12 layers, GPT-2-small shaped).
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=256),
    "small": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
                  intermediate_size=1024),
    "medium": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=12,
                   intermediate_size=3072),
}

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """'bf16'/'bfloat16'/torch.bfloat16 -> torch.bfloat16; None stays None (the checkpoint's own dtype)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(_DTYPES)}")
    return _DTYPES[dtype]


def model_source(name_or_path: str) -> str:
    """Classify `name_or_path` as 'preset', 'local' or 'hub'; a path-looking string that doesn't exist raises."""
    if not isinstance(name_or_path, str) or not name_or_path:
        raise ValueError(f"model_name_or_path must be a preset {sorted(PRESETS)}, a local directory or a hub id, "
                         f"got {name_or_path!r}")
    if name_or_path in PRESETS:
        return "preset"
    path = Path(os.path.expanduser(name_or_path))
    if path.exists():
        if not path.is_dir():
            raise ValueError(f"model path {name_or_path!r} is a file; give the directory written by save_pretrained")
        if not (path / "config.json").exists():
            raise ValueError(f"model directory {name_or_path!r} has no config.json (not a save_pretrained directory)")
        return "local"
    if looks_like_path(name_or_path):
        raise ValueError(f"model path {name_or_path!r} does not exist")
    return "hub"


def preset_config(name: str, tokenizer, max_position_embeddings: int = 1024):
    """A LlamaConfig for preset `name` whose vocabulary and special ids match `tokenizer`."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=True,  # small vocab: tying halves the embedding parameters at no cost
        rope_theta=10000.0,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        **PRESETS[name],
    )


def _hub_error(kind: str, name_or_path: str, err: Exception) -> ValueError:
    return ValueError(f"could not load {kind} {name_or_path!r}: it is neither a preset {sorted(PRESETS)} nor a local "
                      f"directory, and loading it as a hub id failed "
                      f"({type(err).__name__}: {str(err).splitlines()[0]})")


def check_vocab_fits(model: nn.Module, tokenizer, name_or_path: str) -> None:
    """A tokenizer with more tokens than the model's input embedding has rows would feed ids past its end (an
    index error at the first such token, or silently wrong embeddings on some devices): refuse it at load time."""
    if tokenizer is None or model.get_input_embeddings() is None:
        return
    rows = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:
        name = getattr(tokenizer, "name_or_path", "") or "the tokenizer"
        raise ValueError(f"tokenizer {name!r} has {len(tokenizer)} tokens but model {name_or_path!r} embeds only "
                         f"{rows}: token ids >= {rows} have no embedding; use the model's own tokenizer or one "
                         f"it was trained with (tokenizer_name_or_path)")


def load_causal_lm(name_or_path: str, tokenizer=None, torch_dtype: str | torch.dtype | None = None,
                   trust_remote_code: bool = False, seed: int = 0) -> nn.Module:
    """An `AutoModelForCausalLM`-compatible policy from a preset, a local directory or a hub id."""
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    dtype = resolve_dtype(torch_dtype)
    source = model_source(name_or_path)
    if source == "preset":
        if tokenizer is None:
            from .tokenizer import load_tokenizer
            tokenizer = load_tokenizer(name_or_path)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = LlamaForCausalLM(preset_config(name_or_path, tokenizer))
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        return model.to(dtype) if dtype is not None else model
    kwargs = dict(trust_remote_code=trust_remote_code)
    if dtype is not None:
        kwargs["dtype"] = dtype
    try:
        model = AutoModelForCausalLM.from_pretrained(os.path.expanduser(name_or_path), **kwargs)
    except Exception as err:  # noqa: BLE001 - re-raised as one clear line
        if source == "local":
            raise ValueError(f"could not load causal LM from {name_or_path!r}: {type(err).__name__}: "
                             f"{str(err).splitlines()[0]}") from err
        raise _hub_error("model", name_or_path, err) from err
    check_vocab_fits(model, tokenizer, name_or_path)
    return model


def load_sequence_classifier(name_or_path: str, tokenizer=None, torch_dtype: str | torch.dtype | None = None,
                             trust_remote_code: bool = False, seed: int = 0,
                             require_trained_head: bool = False) -> nn.Module:
    """A scalar-head `AutoModelForSequenceClassification` (num_labels=1) from a preset, local dir or hub id.

    A causal-LM checkpoint (e.g. an SFT export) loads too: transformers keeps the backbone and initialises the
    `score` head fresh. That is right for a model about to be trained (`RewardModel`), and wrong for one used as
    a reward (random scores): `require_trained_head=True` refuses a folder or hub id whose head weights are
    missing (presets are random by construction and pass).
    """
    from transformers import AutoModelForSequenceClassification, LlamaForSequenceClassification

    return _load_classifier(AutoModelForSequenceClassification, LlamaForSequenceClassification, 1,
                            ("sequence classifier", "reward model", "RewardModel"), name_or_path, tokenizer,
                            torch_dtype, trust_remote_code, seed, require_trained_head)


def load_token_classifier(name_or_path: str, tokenizer=None, torch_dtype: str | torch.dtype | None = None,
                          trust_remote_code: bool = False, seed: int = 0, require_trained_head: bool = False,
                          num_labels: int = 2) -> nn.Module:
    """An `AutoModelForTokenClassification` (a `score` head on every token's hidden state, `num_labels` classes;
    the process reward model's 0 = incorrect, 1 = correct) from a preset, local dir or hub id. A causal-LM folder
    (an SFT export) loads with a fresh head, as in `load_sequence_classifier`; `require_trained_head` refuses it."""
    from transformers import AutoModelForTokenClassification, LlamaForTokenClassification

    return _load_classifier(AutoModelForTokenClassification, LlamaForTokenClassification, num_labels,
                            ("token classifier", "process reward model", "ProcessRewardModel"), name_or_path,
                            tokenizer, torch_dtype, trust_remote_code, seed, require_trained_head)


def _load_classifier(auto_cls, preset_cls, num_labels: int, names: tuple[str, str, str], name_or_path: str, tokenizer,
                     torch_dtype, trust_remote_code: bool, seed: int, require_trained_head: bool) -> nn.Module:
    """A classifier (`auto_cls`; `preset_cls` for presets, seeded) with a `num_labels` head, its vocabulary checked
    against `tokenizer` and its `pad_token_id` set from it when missing. `names`: (the model kind, what it is used
    as, the module that trains one), for the error messages."""
    kind, what, trained_by = names
    dtype = resolve_dtype(torch_dtype)
    source = model_source(name_or_path)
    if source == "preset":
        if tokenizer is None:
            from .tokenizer import load_tokenizer
            tokenizer = load_tokenizer(name_or_path)
        config = preset_config(name_or_path, tokenizer)
        config.num_labels = num_labels
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = preset_cls(config)
        return model.to(dtype) if dtype is not None else model
    kwargs = dict(trust_remote_code=trust_remote_code, num_labels=num_labels, output_loading_info=True)
    if dtype is not None:
        kwargs["dtype"] = dtype
    try:
        model, info = auto_cls.from_pretrained(os.path.expanduser(name_or_path), **kwargs)
    except Exception as err:  # noqa: BLE001
        if source == "local":
            raise ValueError(f"could not load {kind} from {name_or_path!r}: {type(err).__name__}: "
                             f"{str(err).splitlines()[0]}") from err
        raise _hub_error(what, name_or_path, err) from err
    if require_trained_head:
        _check_trained_head(model, info, name_or_path, what, trained_by)
    check_vocab_fits(model, tokenizer, name_or_path)
    if tokenizer is not None and model.config.pad_token_id is None:
        # the classifier finds the last real token through pad_token_id; without it batched scoring is wrong
        model.config.pad_token_id = tokenizer.pad_token_id
    return model


def _check_trained_head(model: nn.Module, info: dict[str, Any], name_or_path: str, what: str = "reward model",
                        trained_by: str = "RewardModel") -> None:
    """Refuse a classifier whose head weights were missing from the checkpoint (transformers initialised them at
    random and only says so in a load report)."""
    backbone = f"{model.base_model_prefix}."
    fresh = sorted(k for k in info.get("missing_keys", ()) if not k.startswith(backbone))
    if fresh:
        raise ValueError(f"{what} {name_or_path!r} is not a {what}: it has no trained score head "
                         f"({', '.join(fresh)} missing, so it would score at random; a causal-LM folder such as an "
                         f"SFT export?); train one with {trained_by} and pass its hf_model export")


LORA_KEYS = {"r", "alpha", "dropout", "target_modules"}


def lora_config(spec: dict[str, Any], task: str = "causal_lm"):
    """A peft `LoraConfig` from `{r, alpha, dropout, target_modules}`; unknown keys raise.

    Defaults: r=8, alpha=16, dropout=0.0, target_modules=`all-linear` (every Linear but the output head).
    task: `causal_lm` (a policy), `seq_cls` (a reward model) or `token_cls` (a process reward model); for the two
    classifiers the fresh `score` head trains in full beside the adapter (peft's `modules_to_save`) and is saved
    with it: a frozen random head would score nothing.
    """
    from peft import LoraConfig, TaskType

    if not isinstance(spec, dict):
        raise ValueError(f"lora must be a mapping with keys {sorted(LORA_KEYS)}, got {spec!r}")
    unknown = set(spec) - LORA_KEYS
    if unknown:
        raise ValueError(f"lora has unknown keys {sorted(unknown)}; allowed: {sorted(LORA_KEYS)}")
    r, alpha, dropout = spec.get("r", 8), spec.get("alpha", 16), spec.get("dropout", 0.0)
    if not isinstance(r, int) or r < 1:
        raise ValueError(f"lora.r must be an integer >= 1, got {r!r}")
    if not alpha > 0:
        raise ValueError(f"lora.alpha must be > 0, got {alpha!r}")
    if not 0 <= dropout < 1:
        raise ValueError(f"lora.dropout must be in [0, 1), got {dropout!r}")
    target = spec.get("target_modules", "all-linear")
    types = {"causal_lm": TaskType.CAUSAL_LM, "seq_cls": TaskType.SEQ_CLS, "token_cls": TaskType.TOKEN_CLS}
    head = dict(task_type=types[task], **({} if task == "causal_lm" else {"modules_to_save": ["score"]}))
    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout,
                      target_modules=list(target) if isinstance(target, (list, tuple)) else target, **head)


def check_lora_export(lora_export: str) -> str:
    if lora_export not in ("merged", "adapter"):
        raise ValueError(f"lora_export must be merged|adapter, got {lora_export!r}")
    return lora_export


def add_lora(model: nn.Module, config, seed: int) -> nn.Module:
    """`model` wrapped in a peft LoRA adapter: only the adapter (and the config's `modules_to_save`) trains.
    The adapter's random A matrices come from `seed`, reproducible like the presets."""
    from peft import get_peft_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return get_peft_model(model, config)


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Recompute each decoder layer's activations in backward instead of storing them. Non-reentrant: the variant
    that works with FSDP2 units and with frozen (LoRA) inputs."""
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def export_view(model: nn.Module, lora_export: str) -> nn.Module:
    """What an export writes: a plain model as is; a LoRA model's adapter alone (`adapter`), or a copy with the
    adapter merged into the base weights (`merged`: the training model keeps its adapter)."""
    if not hasattr(model, "peft_config") or lora_export == "adapter":
        return model
    return copy.deepcopy(model).merge_and_unload()


def adapter_base(name_or_path: str) -> str:
    """The base an adapter export names in adapter_config.json: a local directory as an absolute path (a relative
    one would resolve against the loader's working directory), a hub id or preset name as given. A preset has no
    files: reload its base with `load_causal_lm(name, seed=...)` / `load_sequence_classifier(name, seed=...)`."""
    if model_source(name_or_path) == "local":
        return str(Path(os.path.expanduser(name_or_path)).resolve())
    return name_or_path


def save_export(model: nn.Module, out: str | os.PathLike, base_name_or_path: str) -> None:
    """`save_pretrained` in safetensors; a LoRA adapter records its base as `adapter_base` gives it."""
    for config in getattr(model, "peft_config", {}).values():
        config.base_model_name_or_path = adapter_base(base_name_or_path)
    model.save_pretrained(out, safe_serialization=True)
