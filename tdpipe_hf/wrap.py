"""``wrap``: give an HF causal LM the TD-Pipe generation mixin and an engine of its own."""

from __future__ import annotations

import dataclasses

from transformers import PreTrainedModel

from .config import TDPipeConfig
from .engine import TDPipeEngine
from .mixin import TDPipeGenerationMixin
from .runtime.attention import register as register_attention
from .runtime.attention import resolve as resolve_attention
from .runtime.placement import (
    offloaded_weights,
    parse_devices,
    remove_dispatch_hooks,
    restore_dispatch,
)

# Architectures whose decoder layers follow Llama's calling convention and take their attention
# from transformers' AttentionInterface (checked by the equality tests).
SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3")
_WRAPPED_CLASSES: dict[type, type] = {}


def _check_model(model) -> None:
    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"tdpipe_hf.wrap needs a transformers PreTrainedModel, got {type(model).__name__}")
    config = model.config
    if getattr(config, "is_encoder_decoder", False) or not hasattr(model, "lm_head") \
            or not hasattr(getattr(model, "model", None), "layers"):
        if config.model_type not in SUPPORTED_MODEL_TYPES and not getattr(config, "is_encoder_decoder", False) \
                and type(model).__name__.endswith(("ForCausalLM", "LMHeadModel")):
            raise TypeError(f"model type {config.model_type!r} ({type(model).__name__}) is not supported yet; "
                            f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
        raise TypeError(f"{type(model).__name__} is not a decoder-only causal LM "
                        "(load it with AutoModelForCausalLM)")
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise TypeError(f"model type {config.model_type!r} is not supported yet; supported: "
                        f"{', '.join(SUPPORTED_MODEL_TYPES)}")
    if getattr(config, "use_sliding_window", False):
        raise TypeError("sliding-window attention is not supported")
    offloaded = offloaded_weights(model)
    if offloaded:
        raise TypeError(f"{len(offloaded)} weights (the first: {offloaded[0]}) are offloaded by accelerate "
                        "(device_map entries 'cpu' or 'disk' beside GPUs); every stage needs its weights on its "
                        "device: load with a device_map that fits, or without one and pass devices=...")


def wrap(model, num_stages: int | None = None, **options):
    """Return ``model`` itself, now generating through a TD-Pipe engine of ``num_stages`` stages
    (default 1).

    ``options`` are :class:`TDPipeConfig` fields (``kv_blocks``, ``block_size``, ...), or
    ``config=TDPipeConfig(...)`` alone (then ``num_stages``, if given, must equal the config's).
    The model keeps working as a plain HF model for ``forward``; ``generate`` and
    ``generate_batch`` run the TD-Pipe loop. Wrapping again replaces the engine.
    """
    config = options.pop("config", None)
    if config is None:
        config = TDPipeConfig.from_kwargs(num_stages=1 if num_stages is None else num_stages, **options)
    elif not isinstance(config, TDPipeConfig):
        raise TypeError(f"config must be a TDPipeConfig, got {type(config).__name__}")
    elif options or (num_stages is not None and num_stages != config.num_stages):
        raise ValueError("pass either config=TDPipeConfig(...) or keyword options, not both "
                         f"(num_stages={num_stages} against the config's {config.num_stages})")
    _check_model(model)
    devices = parse_devices(config.devices) or (str(model.device),)
    config = dataclasses.replace(config, attention_backend=resolve_attention(config.attention_backend, devices))
    undispatched = remove_dispatch_hooks(model)
    # Stages run with tdpipe attention from the moment they exist (under torchrun, ranks other
    # than 0 start serving inside the engine's constructor). Plain forward() is unaffected.
    previous_attention = model.config._attn_implementation
    rewrap = isinstance(model, TDPipeGenerationMixin)
    if rewrap:  # the old engine lets go of its stages (and their devices and memory) first
        model._tdpipe_engine.close()
    model.set_attn_implementation(register_attention(config.attention_backend))
    try:
        engine = TDPipeEngine(model, config)
    except BaseException:  # the model keeps its old engine, if any (it prepares its stages again on use)
        model.set_attn_implementation(previous_attention)
        if undispatched:
            restore_dispatch(model)
        raise
    base = type(model)
    if rewrap:
        base = base.__mro__[2]
    model.eval()
    cls = _WRAPPED_CLASSES.get(base)
    if cls is None:
        # The base's own name: transformers reads the class name (pipelines check it against the
        # supported models, save_pretrained writes it to config.json as the architecture).
        cls = _WRAPPED_CLASSES[base] = type(base.__name__, (TDPipeGenerationMixin, base),
                                            {"__qualname__": base.__qualname__, "__module__": __name__})
    model.__class__ = cls
    model._tdpipe_engine = engine
    model._tdpipe_undispatched = undispatched or getattr(model, "_tdpipe_undispatched", False)
    return model


def unwrap(model):
    """Undo :func:`wrap`: the plain HF class and SDPA attention, engine closed, stages' layers back
    on their devices, and accelerate's dispatch (``hf_device_map``) restored if wrap removed it."""
    if isinstance(model, TDPipeGenerationMixin):
        model._tdpipe_engine.close()
        del model._tdpipe_engine
        model.__class__ = type(model).__mro__[2]
        model.set_attn_implementation("sdpa")
        if model.__dict__.pop("_tdpipe_undispatched", False):
            restore_dispatch(model)
    return model


def from_pretrained(path=None, num_stages: int | None = None, dtype=None, **options):
    """Load ``path`` (default: the shipped SmolLM2) in ``dtype`` (default: as stored) and wrap it
    with ``num_stages`` and ``options`` as :func:`wrap` takes them (``config=`` included).
    Returns (model, tokenizer), the tokenizer padding on the left (what a padded batch for ``generate`` needs). The weights load on the CPU; ``devices=...`` moves the stages."""
    from .models import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(path, dtype=dtype)
    tokenizer.padding_side = "left"  # a padded batch for generate() must be left-padded, as in HF
    return wrap(model, num_stages=num_stages, **options), tokenizer
