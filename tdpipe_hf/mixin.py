"""TDPipeGenerationMixin: HF's ``generate`` contract on top of the TD-Pipe engine.

Arguments are resolved with HF's own helpers (generation config merging, special tokens, max
length, logits processors), so a wrapped model sees the same settings HF ``generate`` would.
Options the engine cannot honour exactly raise ``ValueError`` instead of silently changing results.
"""

from __future__ import annotations

import torch
from transformers import GenerationConfig
from transformers.generation.utils import GenerateDecoderOnlyOutput

from .controller import Request
from .plan import SamplingSpec

_UNSUPPORTED_ARGS = ("prefix_allowed_tokens_fn", "synced_gpus", "assistant_model", "negative_prompt_ids",
                     "negative_prompt_attention_mask", "custom_generate")
_UNSUPPORTED_CONFIG = {
    "guidance_scale": lambda v: v is not None and v != 1,
    "stop_strings": lambda v: bool(v),
    "max_time": lambda v: v is not None,
    "output_attentions": bool,
    "output_hidden_states": bool,
    "output_scores": bool,
    "output_logits": bool,
    "token_healing": bool,
}
_INTEGER_OPTIONS = ("max_new_tokens", "max_length", "min_new_tokens", "min_length", "top_k",
                    "num_return_sequences")


def _check_integer_options(options: dict) -> None:
    """HF compares these with ints deep inside its checks; a string there gets a clear message here."""
    for name in _INTEGER_OPTIONS:
        value = options.get(name)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
            raise TypeError(f"{name} must be an integer, got {value!r}")


class TDPipeGenerationMixin:
    """Mixed in front of the model's class by :func:`tdpipe_hf.wrap`."""

    @property
    def tdpipe_engine(self):
        return self._tdpipe_engine

    # ---- public API ---------------------------------------------------------------------
    def generate(self, inputs: torch.Tensor | None = None, generation_config: GenerationConfig | None = None,
                 logits_processor=None, stopping_criteria=None, streamer=None, **kwargs):
        """Like ``PreTrainedModel.generate``: left-padded ``[batch, len]`` in, ``[batch, len + new]``
        out, finished rows padded with ``pad_token_id``; runs the TD-Pipe loop."""
        for name in _UNSUPPORTED_ARGS:
            if kwargs.pop(name, None) is not None:
                raise ValueError(f"tdpipe_hf generate() does not support `{name}`")
        has_default_max_length = kwargs.get("max_length") is None and (
            generation_config is None or generation_config.max_length is None) and self.generation_config.max_length is None
        has_default_min_length = kwargs.get("min_length") is None and (
            generation_config is None or generation_config.min_length is None) and self.generation_config.min_length is None
        _check_integer_options(kwargs)
        config, model_kwargs = self._prepare_generation_config(generation_config, **kwargs)
        input_ids = inputs if inputs is not None else model_kwargs.pop("input_ids", None)
        attention_mask = model_kwargs.pop("attention_mask", None)
        model_kwargs.pop("use_cache", None)
        if model_kwargs:
            raise ValueError(f"tdpipe_hf generate() does not support the argument(s) {sorted(model_kwargs)}")
        self._check_generation_config(config)
        input_ids, attention_mask = _check_inputs(input_ids, attention_mask)
        caller_device = input_ids.device
        # the engine takes token lists, and logits processors run on the CPU (see sampler.py)
        input_ids = input_ids.cpu()
        attention_mask = None if attention_mask is None else attention_mask.cpu()
        expand = config.num_return_sequences or 1
        if expand > 1:
            input_ids = input_ids.repeat_interleave(expand, dim=0)
            attention_mask = None if attention_mask is None else attention_mask.repeat_interleave(expand, dim=0)
        batch_size, length = input_ids.shape
        self._prepare_special_tokens(config, attention_mask is not None, device=input_ids.device, batch_size=batch_size)
        if attention_mask is None:
            attention_mask = self._prepare_attention_mask_for_generation(input_ids, config, {})
        config = self._prepare_generated_length(
            generation_config=config, has_default_max_length=has_default_max_length,
            has_default_min_length=has_default_min_length, model_input_name="input_ids",
            inputs_tensor=input_ids, input_ids_length=length)
        self._validate_generated_length(config, length, has_default_max_length)
        specs = self._row_sampling_specs(config, input_ids, attention_mask, logits_processor)
        eos = _token_set(config._eos_token_tensor)
        max_new = config.max_length - length

        stopping = BatchStopping(stopping_criteria, int(config._pad_token_tensor)
                                 if config._pad_token_tensor is not None else 0) if stopping_criteria else None
        requests = []
        for row in range(batch_size):
            mask = attention_mask[row].bool()
            pad = int((~mask).sum())
            if mask[pad:].sum() != length - pad:
                raise ValueError(f"row {row} of attention_mask is not left-padded (zeros must come first); "
                                 "tokenize with padding_side='left'")
            ids = input_ids[row].tolist()
            requests.append(self._make_request(row, ids[pad:], max_new, eos, specs[row], stopping, ids[:pad]))
        if stopping is not None:
            stopping.requests = requests

        if streamer is not None:
            if batch_size != 1:
                raise ValueError("a streamer works with batch size 1 only (as in HF generate)")
            streamer.put(input_ids.cpu())
            on_token = lambda request, token: streamer.put(torch.tensor([token]))  # noqa: E731
        else:
            on_token = None
        try:
            self._tdpipe_engine.run(requests, on_token=on_token)
        finally:
            if streamer is not None:
                streamer.end()

        sequences = _assemble(input_ids, requests, config._pad_token_tensor).to(caller_device)
        if config.return_dict_in_generate:
            return GenerateDecoderOnlyOutput(sequences=sequences)
        return sequences

    def generate_batch(self, inputs: list[list[int]], generation_config: GenerationConfig | None = None,
                       progress_bar: bool = False, **kwargs) -> list[list[int]]:
        """Throughput mode: unpadded prompts in, every request's generated ids out, in order."""
        if not isinstance(inputs, (list, tuple)):
            raise TypeError(f"generate_batch expects a list of token-id lists, got {type(inputs).__name__}")
        _check_integer_options(kwargs)
        config, model_kwargs = self._prepare_generation_config(generation_config, **kwargs)
        if model_kwargs:
            raise ValueError(f"tdpipe_hf generate_batch() does not support the argument(s) {sorted(model_kwargs)}")
        self._check_generation_config(config)
        if (config.num_return_sequences or 1) > 1:
            raise ValueError("generate_batch does not support num_return_sequences > 1; repeat the prompt instead")
        self._prepare_special_tokens(config, True, device="cpu", batch_size=len(inputs))
        processors = self._get_logits_processor(generation_config=config, device="cpu", model_kwargs={})
        spec = SamplingSpec(do_sample=bool(config.do_sample), processors=processors if len(processors) else None)
        eos = _token_set(config._eos_token_tensor)
        requests = []
        for index, prompt in enumerate(inputs):
            ids = _check_token_list(index, prompt)
            max_new = config.max_new_tokens if config.max_new_tokens is not None else config.max_length - len(ids)
            if max_new < 1:
                raise ValueError(f"prompt {index} leaves no room to generate: {len(ids)} tokens, max_length "
                                 f"{config.max_length}; set max_new_tokens")
            requests.append(self._make_request(index, ids, max_new, eos, spec, None, []))
        if requests:
            self._tdpipe_engine.run(requests, progress=progress_bar)
        return [r.output_ids for r in requests]

    # ---- helpers --------------------------------------------------------------------------
    def _row_sampling_specs(self, config, input_ids, attention_mask, logits_processor) -> list[SamplingSpec]:
        """One spec per row. Processors are built per row, from that row's own ids and mask, because
        the engine applies them one request at a time and some (repetition penalty) depend on the
        row's padding."""
        def processors_for(rows: slice):
            return self._get_logits_processor(
                generation_config=config, input_ids_seq_length=input_ids.shape[1], encoder_input_ids=input_ids[rows],
                logits_processor=logits_processor, device=input_ids.device,
                model_kwargs={"attention_mask": attention_mask[rows]})

        do_sample = bool(config.do_sample)
        if not len(processors_for(slice(0, 1))):
            return [SamplingSpec(do_sample=do_sample)] * input_ids.shape[0]
        return [SamplingSpec(do_sample=do_sample, processors=processors_for(slice(row, row + 1)))
                for row in range(input_ids.shape[0])]

    def _make_request(self, index, prompt, max_new, eos, spec, stopping_criteria, prefix) -> Request:
        if not prompt:
            raise ValueError(f"prompt {index} is empty: every request needs at least one token")
        check_vocabulary(f"prompt {index}", prompt, self.config.vocab_size)
        context = getattr(self.config, "max_position_embeddings", None)
        if context is not None and len(prompt) > context:
            raise ValueError(f"prompt {index} has {len(prompt)} tokens, more than the model's context of {context}")
        return Request(request_id=index, prompt_ids=list(prompt), max_new_tokens=max_new, eos_token_ids=eos,
                       sampling=spec, stopping_criteria=stopping_criteria or None, history_prefix=list(prefix))

    @staticmethod
    def _check_generation_config(config: GenerationConfig) -> None:
        mode = config.get_generation_mode()
        if mode.value not in ("greedy_search", "sample"):
            raise ValueError(f"tdpipe_hf supports greedy decoding and sampling, not {mode.value} "
                             f"(num_beams={config.num_beams})")
        for field, unsupported in _UNSUPPORTED_CONFIG.items():
            value = getattr(config, field, None)
            if unsupported(value):
                raise ValueError(f"tdpipe_hf does not support generation option {field}={value!r}")


def _check_inputs(input_ids, attention_mask) -> tuple[torch.Tensor, torch.Tensor | None]:
    if input_ids is None:
        raise ValueError("generate() needs input_ids (prompts to complete)")
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(f"input_ids must be a torch.Tensor, got {type(input_ids).__name__}")
    if input_ids.dim() != 2 or input_ids.dtype not in (torch.long, torch.int, torch.int32):
        raise ValueError(f"input_ids must be a 2-D integer tensor [batch, length], got shape "
                         f"{tuple(input_ids.shape)} dtype {input_ids.dtype}")
    if input_ids.shape[0] == 0:
        raise ValueError("input_ids has no rows: give at least one prompt")
    if input_ids.shape[1] == 0:
        raise ValueError("input_ids has length 0: prompts must not be empty")
    if attention_mask is not None and not isinstance(attention_mask, torch.Tensor):
        raise TypeError(f"attention_mask must be a torch.Tensor, got {type(attention_mask).__name__}")
    if attention_mask is not None and attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} differs from input_ids "
                         f"shape {tuple(input_ids.shape)}")
    return input_ids.long(), attention_mask


def _check_token_list(index: int, prompt) -> list[int]:
    if isinstance(prompt, torch.Tensor):
        prompt = prompt.tolist()
    if not isinstance(prompt, (list, tuple)) or not all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        raise TypeError(f"prompt {index} must be a list of token ids (ints)")
    return list(prompt)


def check_vocabulary(what: str, prompt: list[int], vocab_size: int) -> None:
    """A ValueError naming ``what`` when a token id is not an int in ``[0, vocab_size)``: caught
    at submission, it would otherwise reach a stage as an index error."""
    bad = [t for t in prompt if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab_size]
    if bad:
        raise ValueError(f"{what} has token ids outside the vocabulary [0, {vocab_size}): {bad[:5]}")


def eos_token_ids(generation_config: GenerationConfig) -> frozenset[int]:
    """The ids that end a request, from a generation config (one id, a list, or none)."""
    eos = generation_config.eos_token_id
    return frozenset() if eos is None else _token_set(torch.tensor(eos))


def _token_set(tensor: torch.Tensor | None) -> frozenset[int]:
    return frozenset() if tensor is None else frozenset(tensor.flatten().tolist())


def _assemble(input_ids: torch.Tensor, requests: list[Request], pad: torch.Tensor | None) -> torch.Tensor:
    width = max(len(r.output_ids) for r in requests)
    pad_id = int(pad) if pad is not None else 0
    new = torch.full((len(requests), width), pad_id, dtype=torch.long)
    for row, request in enumerate(requests):
        new[row, :len(request.output_ids)] = torch.tensor(request.output_ids, dtype=torch.long)
    return torch.cat([input_ids, new], dim=1)


class BatchStopping:
    """HF stopping criteria for the requests of one ``generate`` call, called as HF calls them:
    with the whole batch's ids (``[batch, length]``, each row its left padding, prompt and
    outputs so far). Rows advance at their own pace in the engine, so when a row has just
    sampled, its own ids end the tensor and the other rows are cut or right-padded with
    ``pad_id`` to that length. A criterion answering per row (HF's own) decides for that row; one
    answering for the whole batch (a single bool, as lm-evaluation-harness's stop sequences do)
    stops a row when it says the batch is done, as HF would stop them all then."""

    def __init__(self, criteria, pad_id: int):
        self.criteria = criteria
        self.pad_id = pad_id
        self.requests: list[Request] = []

    def should_stop(self, request: Request) -> bool:
        width = len(request.history)
        ids = torch.full((len(self.requests), width), self.pad_id, dtype=torch.long)
        for row, other in enumerate(self.requests):
            history = other.history[:width]
            ids[row, :len(history)] = torch.tensor(history, dtype=torch.long)
        done = torch.as_tensor(self.criteria(ids, None)).reshape(-1)
        return bool(done[0] if done.numel() == 1 else done[self.requests.index(request)])
