"""Throughput benchmark: HF ``generate``, HF ``generate_batch`` and tdpipe_hf on the same prompts.

Every system gets the same chat-templated prompts and the same ``max_new_tokens`` (greedy, natural
EOS) in one process, one after the other. Tokens counted are generated tokens up to and including
EOS; HF's padding after EOS is not counted. This module measures; it asserts nothing.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

import torch

from ..mixin import eos_token_ids
from ..models import chat_prompt_ids
from ..runtime import attention, packed_linear
from ..variants import variant

SAMPLE_PROMPTS = "sample_prompts.jsonl"
SYSTEMS = ("hf-generate", "hf-generate_batch", "tdpipe", "tdpipe-dist", "vllm", "gemm-bound")
@dataclass
class BenchRow:
    system: str
    stages: int
    requests: int
    generated_tokens: int
    seconds: float
    tokens_per_s: float
    threads: int | None = None  # torch threads (per stage process for the distributed executor)
    same_as_hf: int | None = None  # requests whose tokens equal HF generate's (greedy)
    policy: str = "tdpipe"
    preemptions: int | None = None
    cached_tokens: int | None = None  # prompt tokens taken from the prefix cache
    kv_utilisation: float | None = None  # time-weighted mean share of KV blocks in use
    decode_imbalance: float | None = None  # mean (max - min) / mean rows of decode batches in flight together
    decode_bubble: list[float] | None = None  # per stage, idle share of the decode phase
    bubble: list[float] | None = None  # per stage, idle share of the whole run
    backend: str | None = None  # tdpipe rows: the attention backend that ran
    # mean share of each request's tokens, from the start, equal to HF generate's: 1.0 when all are
    # the same; below 1 it says how early answers part (in bfloat16, batch shape alone can part them)
    matching_prefix: float | None = None
    round: int = 0  # with ``rounds`` > 1: which pass over the tdpipe rows this row came from


def sample_prompts_path() -> Path:
    """The sample prompts shipped in the package (a JSONL file with a ``prompt`` field)."""
    return Path(str(resources.files("tdpipe_hf").joinpath("data", SAMPLE_PROMPTS)))


def load_prompts(path: str | Path | None = None, limit: int | None = None) -> list[str]:
    """Prompts from a JSONL file with a ``prompt`` field (default: the samples shipped in the package)."""
    text = Path(path or sample_prompts_path()).read_text(encoding="utf-8-sig")
    prompts = []
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                record = json.loads(line)
            except ValueError as exc:
                raise ValueError(f"{path or SAMPLE_PROMPTS}:{number}: not valid JSON: {exc}") from None
            if not isinstance(record, dict) or not isinstance(record.get("prompt"), str) or not record["prompt"].strip():
                raise ValueError(f"{path or SAMPLE_PROMPTS}:{number}: needs a non-empty 'prompt' string")
            prompts.append(record["prompt"])
    return prompts[:limit] if limit else prompts


def chat_token_ids(tokenizer, prompts: list[str]) -> list[list[int]]:
    return [chat_prompt_ids(tokenizer, [{"role": "user", "content": prompt}]) for prompt in prompts]


def _trim_at_eos(tokens: list[int], eos: set[int]) -> list[int]:
    for i, token in enumerate(tokens):
        if token in eos:
            return tokens[:i + 1]
    return tokens


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` of a left-padded batch, as HF ``generate`` expects."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(prompt)
        mask[row, width - len(prompt):] = 1
    return ids, mask


def run_hf_generate(model, prompts: list[list[int]], max_new_tokens: int, batch_size: int, pad_id: int,
                    eos: set[int]) -> list[list[int]]:
    """HF ``generate`` over static, left-padded batches (prompts sorted by length to limit padding)."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    outputs: list[list[int]] = [[] for _ in prompts]
    for begin in range(0, len(order), batch_size):
        group = order[begin:begin + batch_size]
        ids, mask = left_pad([prompts[i] for i in group], pad_id)
        ids, mask = ids.to(model.device), mask.to(model.device)
        width = ids.shape[1]
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=pad_id)
        for row, i in enumerate(group):
            outputs[i] = _trim_at_eos(out[row, width:].tolist(), eos)
    return outputs


def run_hf_generate_batch(model, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """HF's own continuous batching (``generate_batch``)."""
    from transformers import GenerationConfig

    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False,
                              eos_token_id=model.generation_config.eos_token_id,
                              pad_token_id=model.generation_config.pad_token_id)
    with torch.inference_mode():
        results = model.generate_batch(prompts, generation_config=config, progress_bar=False)
    return [list(results[f"req_{i}"].generated_tokens) for i in range(len(prompts))]


def _timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def run_benchmark(model, tokenizer, prompts: list[str], max_new_tokens: int = 128, stages: tuple[int, ...] = (1, 2),
                  hf_batch_size: int = 16, systems: tuple[str, ...] = SYSTEMS,
                  tdpipe_options: dict | None = None, dist_stages: tuple[int, ...] = (2,),
                  local_threads: tuple[int, ...] = (), trace: str | None = None,
                  policies: tuple[str, ...] = ("tdpipe",), vllm_python: str | None = None,
                  backends: tuple[str, ...] = ("auto",), log=print,
                  on_row: Callable[[list[BenchRow]], None] | None = None, rounds: int = 1) -> list[BenchRow]:
    """Run ``systems`` one after the other on the same prompts, tdpipe once per policy variant
    (names in ``tdpipe_hf.variants``). ``trace``: write the last distributed run's timeline as a Chrome trace
    (``trace``) and a PNG (``trace`` + ``.png``); with several policies, one of each per policy
    (``trace`` with ``-POLICY`` before its suffix; likewise ``-BACKEND`` with several backends). ``vllm``: vLLM's CPU build under ``vllm_python``
    (see ``vllm_peer``); ``gemm-bound``: the tokens/s the machine's dense matrix products alone allow
    (:func:`gemm_bound`), measured in the same run. ``backends``: tdpipe runs once per attention
    backend named (``auto``: the one chosen for the devices). HF ``generate`` runs once untimed first,
    so that neither side pays the device's first-use costs in its figure. ``on_row`` gets the rows
    so far after each one, so a run cut short keeps what it measured. ``rounds``: the tdpipe rows run
    that many times, every other round in reverse order, so that a host whose speed drifts during
    the run favours no row (:func:`format_rounds` pairs them up); the other systems run once."""
    if rounds < 1:
        raise ValueError(f"rounds must be at least 1, got {rounds}")
    import tdpipe_hf
    from tdpipe_hf import metrics
    from tdpipe_hf.runtime.placement import parse_devices

    ids = chat_token_ids(tokenizer, prompts)
    eos = set(eos_token_ids(model.generation_config))
    pad_id = model.generation_config.pad_token_id
    pad_id = pad_id if pad_id is not None else min(eos)
    rows: list[BenchRow] = []
    reference = None

    def add(system: str, n_stages: int, outputs: list[list[int]], seconds: float, stats=None,
            threads: int | None = None, policy: str = "-", backend: str | None = None, pass_: int = 0,
            cached_tokens: int | None = None) -> None:
        generated = sum(len(o) for o in outputs)
        same = None if reference is None else sum(a == b for a, b in zip(outputs, reference))
        row = BenchRow(system, n_stages, len(outputs), generated, round(seconds, 3),
                       round(generated / seconds, 2), threads or torch.get_num_threads(), same, policy,
                       backend=backend, round=pass_, cached_tokens=cached_tokens)
        if reference is not None:
            row.matching_prefix = round(matching_prefix(outputs, reference), 4)
        line = (f"  {system:<20} {policy:<16} {backend or '-':<14} stages={n_stages} {generated} tokens in "
                f"{seconds:.1f}s -> {row.tokens_per_s:.1f} tok/s" + (f" (round {pass_ + 1})" if rounds > 1 else ""))
        if cached_tokens is not None:
            line += f"; {cached_tokens} prompt tokens from its prefix cache"
        if stats is not None:
            row.preemptions = stats.preemptions
            row.cached_tokens = stats.cached_tokens
            row.kv_utilisation = round(metrics.mean_kv_utilisation(stats.kv_used, stats.kv_blocks), 4)
            row.decode_imbalance = round(metrics.decode_imbalance(stats.decode_batches, n_stages)["rows"], 4)
            bubbles = metrics.bubble_ratios(stats.timeline)
            row.bubble = [round(r, 4) for r in bubbles.get("all", {}).values()]
            row.decode_bubble = [round(r, 4) for r in bubbles.get("decode", {}).values()]
            line += f"; {metrics.format_bubbles(bubbles)}"
        rows.append(row)
        log(line)
        if on_row is not None:
            on_row(rows)

    def run_tdpipe(system: str, n_stages: int, threads: int | None = None, policy: str = "tdpipe",
                   backend: str = "auto", pass_: int = 0, **options) -> None:
        options = {**(tdpipe_options or {}), **variant(policy, engine=True).options, **options}
        devices = parse_devices(options.get("devices"))
        if devices is not None and len(devices) > n_stages:  # each row runs on the first devices listed
            options["devices"] = devices[:n_stages]
        options["attention_backend"] = backend = attention.resolve(backend, options.get("devices"))
        tdpipe_hf.wrap(model, num_stages=n_stages, **options)
        default_threads = torch.get_num_threads()
        if threads and options.get("executor") != "distributed":
            torch.set_num_threads(threads)
        try:
            model.generate_batch(ids[:1], max_new_tokens=1)  # start workers outside the timing
            outputs, seconds = _timed(lambda: model.generate_batch(ids, max_new_tokens=max_new_tokens,
                                                                   do_sample=False))
            stats = model.tdpipe_engine.last_stats
            if options.get("executor") == "distributed":
                threads = model.tdpipe_engine.executor.threads
        finally:
            tdpipe_hf.unwrap(model)
            torch.set_num_threads(default_threads)
        add(system, n_stages, outputs, seconds, stats, threads, policy, backend, pass_)
        if trace and options.get("executor") == "distributed":
            path = Path(trace)
            tags = ([policy] if len(policies) > 1 else []) + ([backend] if len(backends) > 1 else [])
            if tags:
                path = path.with_name(f"{path.stem}-{'-'.join(tags)}{path.suffix}")
            metrics.write_chrome_trace(stats.timeline, path)
            metrics.plot_timeline(stats.timeline, f"{path}.png", f"{system} {policy}, {n_stages} stages")

    if "hf-generate" in systems:
        tdpipe_hf.unwrap(model)
        run_hf_generate(model, ids[:2], 2, hf_batch_size, pad_id, eos)  # warm-up, untimed
        outputs, seconds = _timed(lambda: run_hf_generate(model, ids, max_new_tokens, hf_batch_size, pad_id, eos))
        reference = outputs
        add("hf-generate", 1, outputs, seconds)
    if "hf-generate_batch" in systems:
        tdpipe_hf.unwrap(model)
        try:
            outputs, seconds = _timed(lambda: run_hf_generate_batch(model, ids, max_new_tokens))
            add("hf-generate_batch", 1, outputs, seconds)
        except Exception as exc:  # report, keep benchmarking the rest
            log(f"  hf-generate_batch failed: {type(exc).__name__}: {exc}")
    if "vllm" in systems:
        from . import vllm_peer

        with tempfile.TemporaryDirectory() as scratch:
            tdpipe_hf.unwrap(model)
            directory = vllm_peer.export_hf_directory(model, tokenizer, Path(scratch) / "model")
            dtype = str(model.dtype).removeprefix("torch.")
            try:
                outputs, seconds, cached = vllm_peer.run_vllm(vllm_python or "", directory, ids, max_new_tokens,
                                                              eos, dtype)
                add("vllm", 1, [_trim_at_eos(o, eos) for o in outputs], seconds, cached_tokens=cached)
            except (RuntimeError, FileNotFoundError, OSError) as exc:  # report, keep benchmarking the rest
                log(f"  vllm failed: {exc}")
    if "gemm-bound" in systems:
        tdpipe_hf.unwrap(model)
        rate, per_token = gemm_bound(model, rows=min(len(ids), 64))
        rows.append(BenchRow("gemm-bound", 1, 0, 0, 0.0, round(rate, 2), torch.get_num_threads()))
        log(f"  gemm-bound: {per_token / 1e9:.3f} GFLOP a token in dense products -> {rate:.1f} tok/s "
            f"at the measured rate")
        if on_row is not None:
            on_row(rows)
    for policy in policies:
        variant(policy, engine=True)  # unknown names fail before anything runs
    tdpipe_rows = []  # (system, stages, options of run_tdpipe), in the order of a forward round
    for policy in policies:
        for backend in backends:
            if "tdpipe" in systems:
                for n_stages in stages:
                    tdpipe_rows.append(("tdpipe-local", n_stages, dict(policy=policy, backend=backend)))
                    for threads in local_threads:
                        tdpipe_rows.append(("tdpipe-local", n_stages,
                                            dict(threads=threads, policy=policy, backend=backend)))
            if "tdpipe-dist" in systems:
                for n_stages in dist_stages:
                    tdpipe_rows.append(("tdpipe-distributed", n_stages,
                                        dict(policy=policy, backend=backend, executor="distributed")))
    for pass_ in range(rounds):
        for system, n_stages, options in (tdpipe_rows if pass_ % 2 == 0 else reversed(tdpipe_rows)):
            run_tdpipe(system, n_stages, pass_=pass_, **options)
    return rows


def format_rounds(rows: list[BenchRow]) -> str:
    """The tdpipe rows of a run with several rounds, one line per configuration: median tokens/s
    over the rounds, the range, and the median over rounds of its ratio to the first
    configuration's row of the same round (a ratio within a round, so the host's drift between
    rounds cancels). Empty if the run had one round."""
    repeated = [r for r in rows if r.stages and r.system.startswith("tdpipe")]
    if not any(r.round for r in repeated):
        return ""
    def key(r: BenchRow):
        return (r.system, r.policy, r.backend, r.stages, r.threads)
    configs: dict = {}
    for r in repeated:
        configs.setdefault(key(r), {})[r.round] = r.tokens_per_s
    first = next(iter(configs.values()))
    system, policy, backend, n_stages, _ = next(iter(configs))
    name = f"{system} {policy} ({backend or '-'}, {n_stages} stage{'s' if n_stages > 1 else ''})"
    lines = [f"| system | policy | backend | stages | rounds | median tokens/s | range | vs {name} "
             "(median of per-round ratios) |", "|---|---|---|---|---|---|---|---|"]
    for (system, policy, backend, n_stages, _), by_round in configs.items():
        rates = sorted(by_round.values())
        ratios = [rate / first[i] for i, rate in by_round.items() if i in first]
        lines.append(f"| {system} | {policy} | {backend or '-'} | {n_stages} | {len(rates)} | "
                     f"{statistics.median(rates):.1f} | {rates[0]:.1f}-{rates[-1]:.1f} | "
                     f"{statistics.median(ratios):.3f}x |")
    return "\n".join(lines)


def matching_prefix(outputs: list[list[int]], reference: list[list[int]]) -> float:
    """Mean over requests of the leading tokens equal to ``reference``'s, as a share of the longer answer."""
    shares = []
    for mine, theirs in zip(outputs, reference):
        common = next((i for i, (a, b) in enumerate(zip(mine, theirs)) if a != b), min(len(mine), len(theirs)))
        shares.append(common / max(len(mine), len(theirs), 1))
    return sum(shares) / max(len(shares), 1)


def gemm_bound(model, rows: int = 64, repeats: int = 20) -> tuple[float, float]:
    """(tokens/s, FLOPs a token) if a step cost only its dense matrix products: every linear layer
    of the model (the LM head included) timed on ``rows`` rows, as in a decode step of ``rows``
    requests, with the model's own weights, dtype and thread count, each by the faster of
    ``F.linear`` and (on CPU in float32) the oneDNN product on packed weights that stages use.
    Attention, norms and sampling are left out, so no engine can beat it at that batch size."""
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    seconds = flops = 0.0
    with torch.inference_mode():
        for layer in linears:
            x = torch.randn(rows, layer.in_features, dtype=layer.weight.dtype, device=layer.weight.device)
            products = [lambda: torch.nn.functional.linear(x, layer.weight, layer.bias)]
            if packed_linear.available(layer.weight):
                packed = packed_linear.pack(layer.weight)
                products.append(lambda: packed_linear.packed_product(x, packed, layer.bias))
            seconds += min(packed_linear.best_seconds(product, repeats) for product in products)
            flops += 2 * layer.in_features * layer.out_features
    return rows / seconds, flops


def format_table(rows: list[BenchRow]) -> str:
    base = next((r.tokens_per_s for r in rows if r.system == "hf-generate"), None)
    peer = next((r.tokens_per_s for r in rows if r.system == "vllm"), None)
    lines = ["| system | policy | backend | stages | threads | requests | generated tokens | seconds | tokens/s "
             "| vs HF generate | vs vLLM | same tokens as HF | preemptions | KV use | decode imbalance "
             "| decode bubble per stage |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def share(value):
        return "-" if value is None else f"{value:.1%}"

    for r in rows:
        ratio = f"{r.tokens_per_s / base:.2f}x" if base else "-"
        versus_peer = f"{r.tokens_per_s / peer:.2f}x" if peer else "-"
        same = "-" if r.same_as_hf is None else f"{r.same_as_hf}/{r.requests}"
        bubble = " / ".join(f"{b:.1%}" for b in r.decode_bubble) if r.decode_bubble else "-"
        preempt = "-" if r.preemptions is None else r.preemptions
        lines.append(f"| {r.system} | {r.policy} | {r.backend or '-'} | {r.stages} | {r.threads} | {r.requests} | {r.generated_tokens} | "
                     f"{r.seconds:.1f} | {r.tokens_per_s:.1f} | {ratio} | {versus_peer} | {same} | {preempt} | "
                     f"{share(r.kv_utilisation)} | {share(r.decode_imbalance)} | {bubble} |")
    return "\n".join(lines)


def write_json(rows: list[BenchRow], path: str | Path) -> None:
    Path(path).write_text(json.dumps([asdict(r) for r in rows], indent=2) + "\n")
