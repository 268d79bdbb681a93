"""Tokenizers: a built-in character tokenizer for the offline default, and one loader for every source.

No machine here can reach a model hub, so the whole pipeline must run on a tokenizer we can build from
nothing. A character tokenizer is the smallest honest choice: one token per character, so arithmetic tasks
see every digit, and it is a real `PreTrainedTokenizerFast` that saves and loads like any hub tokenizer.
The real path (hub id or local directory) goes through the same `load_tokenizer`.
"""

from __future__ import annotations

import os
import socket
import warnings

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from .infra.paths import looks_like_path

PAD_TOKEN, EOS_TOKEN, UNK_TOKEN = "<pad>", "<eos>", "<unk>"
SPECIAL_TOKENS = [PAD_TOKEN, EOS_TOKEN, UNK_TOKEN]  # ids 0, 1, 2
# Fixed order, never reorder or insert: ids must stay stable so saved checkpoints keep their meaning.
CHARS = [chr(c) for c in range(32, 127)] + ["\n"]  # ids 3..97 printable ASCII, 98 newline
CHAR_TOKENIZER_NAMES = (None, "char")

# One line per message, then the assistant's turn is opened: "user: 7+5=\nassistant: ".
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


def build_char_tokenizer() -> PreTrainedTokenizerFast:
    """One token per character of printable ASCII plus newline; pad=0, eos=1, unk=2, chars from 3.

    pad differs from eos on purpose: a model that learns to emit eos must not have eos masked as padding.
    Left padding, because generation appends to the right of the prompt batch.
    `decode(encode(s)) == s` for every string over the vocabulary (the Fuse decoder joins tokens with
    nothing between them; clean-up of tokenization spaces is off).
    """
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + CHARS)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK_TOKEN))
    # Split every character (newline included) into its own piece; WordLevel then maps piece -> id.
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens(SPECIAL_TOKENS)  # so "<eos>" in text is one token, and skip_special_tokens works
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=UNK_TOKEN,
        padding_side="left",
        model_max_length=1_000_000,
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.name_or_path = "char"
    return tokenizer


def _hub_unreachable() -> bool:
    """True when the hub surely cannot be reached: offline mode is on, or its host does not resolve.

    Without this check a missing hub id costs ~50 s of silent HTTP retries on an offline machine.
    With a proxy configured local DNS says nothing, so we then let the real request decide.
    """
    import huggingface_hub.constants as hf_constants

    if hf_constants.HF_HUB_OFFLINE:
        return True
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY")):
        return False
    host = hf_constants.ENDPOINT.split("://", 1)[-1].split("/", 1)[0].split(":", 1)[0]
    try:
        socket.getaddrinfo(host, 443)
    except OSError:
        return True
    return False


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0] if text else ''}"


def load_tokenizer(
    name_or_path: str | os.PathLike | None, trust_remote_code: bool = False
) -> PreTrainedTokenizerBase:
    """Resolve a tokenizer: None / "char" / a model preset name -> the char tokenizer; a local directory or
    hub id -> `AutoTokenizer.from_pretrained`.

    Always returns a left-padding tokenizer with a pad token (eos stands in for a missing pad, with a
    warning), because rollouts batch prompts by left padding.
    """
    if name_or_path is not None:
        name_or_path = os.fspath(name_or_path)
    if name_or_path in CHAR_TOKENIZER_NAMES:
        return build_char_tokenizer()
    if not isinstance(name_or_path, str) or not name_or_path.strip():
        raise ValueError(f"tokenizer name_or_path must be a non-empty string, got {name_or_path!r}")

    from rlhf_lightning.models import PRESETS  # here, not at the top: models.py may import this module

    if name_or_path in PRESETS:  # presets are built from scratch on the char vocabulary
        return build_char_tokenizer()

    path = os.path.expanduser(name_or_path)
    if os.path.isdir(path):
        try:
            tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        except Exception as err:
            raise ValueError(f"could not load a tokenizer from directory {path!r}: {_first_line(err)}") from err
    elif os.path.exists(path):
        raise ValueError(f"tokenizer path {path!r} is a file; pass the directory written by save_pretrained")
    elif looks_like_path(name_or_path):
        raise ValueError(f"tokenizer path {name_or_path!r} does not exist")
    else:
        tokenizer = _load_from_hub(name_or_path, trust_remote_code)

    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"tokenizer {name_or_path!r} has neither a pad nor an eos token; set one before use")
        warnings.warn(f"tokenizer {name_or_path!r} has no pad token; using eos {tokenizer.eos_token!r} as pad",
                      stacklevel=2)
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _load_from_hub(name: str, trust_remote_code: bool) -> PreTrainedTokenizerBase:
    """The local HF cache first (works offline), then the network if it can be reached."""
    try:
        return AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code, local_files_only=True)
    except OSError:
        pass  # not in the cache
    except Exception as err:  # found, but unusable (e.g. needs trust_remote_code)
        raise ValueError(f"could not load tokenizer {name!r} from the HF cache: {_first_line(err)}") from err
    if _hub_unreachable():
        raise ValueError(
            f"tokenizer {name!r} was not found locally (no such directory, not in the HF cache) and the hub "
            "cannot be reached (no network here); pass a local directory, 'char', or a model preset name"
        )
    try:
        return AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    except Exception as err:
        raise ValueError(
            f"tokenizer {name!r} could not be found locally or on the hub: {_first_line(err)}"
        ) from err
