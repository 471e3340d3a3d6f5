"""Named schedule variants: the one table the CLI, the benchmark, the simulator and the demo read.

A variant is a set of ``TDPipeConfig`` options with a name and a one-line summary: TD-Pipe, TD-Pipe
with one mechanism changed, and the baseline schedules. ``tdpipe policies`` prints this table.
Simulator-only fields say how ``tdpipe simulate`` runs it: pipeline (``pp``, one stage per GPU)
or tensor parallel (``tp``, not available in the real engine), which length predictor greedy
prefill gets there (``realistic``: the true lengths with the shipped predictor's measured
out-of-sample error, see ``NoisyOraclePredictor``; ``oracle``: the true lengths, an upper bound;
``constant``: their mean) and its prefill chunk; ``vllm_v0_host`` marks the baselines that stand
for vLLM v0 as the paper measured it (its PP and TP), which pay ``tdpipe simulate --vllm-step-cost``.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Variant:
    name: str
    summary: str
    options: dict = field(default_factory=dict)  # TDPipeConfig fields
    parallel: str = "pp"  # "pp" or "tp" (simulator only)
    sim_predictor: str | None = None  # "realistic", "oracle", "constant" or None (admission needs none)
    sim_chunk_tokens: int = 512
    engine: bool = True  # False: the simulator only (needs what only a simulation has)
    vllm_v0_host: bool = False  # simulator: pays vLLM v0's per-step host work on every stage

    @property
    def in_engine(self) -> bool:
        """Whether the real engine can run it (tensor parallelism and true lengths exist only in
        the simulator)."""
        return self.parallel == "pp" and self.engine


# vLLM's default scheduler without chunked prefill: prefill whenever a waiting request fits,
# otherwise decode (the phase machine with admit-while-it-fits and a switch that leaves decode as
# soon as anything can be admitted), prefill batches in arrival order up to 2048 tokens.
_SEPARATE = dict(policy="tdpipe", admission="fits", stealing=False, switch_policy="threshold", switch_fraction=1.0,
                 prefill_packing="fcfs")

VARIANTS: dict[str, Variant] = {v.name: v for v in [
    Variant("tdpipe", "TD-Pipe: a prefill phase admits requests greedily (predicted output lengths keep the "
                      "simulated KV peak under budget), then a decode phase keeps one micro-batch per stage "
                      "circulating with work stealing between them, and hands back to prefill when measured "
                      "stage times say it pays off; admission overbooks the KV where those times say that "
                      "pays.", {}, sim_predictor="realistic"),
    Variant("tdpipe-oracle", "TD-Pipe planning with the true output lengths (simulator only): the upper bound "
                             "of any length predictor.", {}, sim_predictor="oracle", engine=False),
    Variant("tdpipe-paper", "TD-Pipe with the paper's exact rules: stealing balanced by rows, the plain "
                            "intensity switch, prefill batches in arrival order.",
            {"paper_rules": True}, sim_predictor="realistic"),
    Variant("tdpipe-constant", "TD-Pipe planning with a constant length guess instead of a trained predictor.",
            {"predictor": "constant"}, sim_predictor="constant"),
    Variant("tdpipe-rowsteal", "TD-Pipe with the paper's stealing rule alone (even rows per micro-batch, not "
                               "even estimated time).", {"decode_batcher": "steal-rows"}, sim_predictor="realistic"),
    Variant("tdpipe-nosteal", "TD-Pipe without work stealing: each request stays in the decode micro-batch it "
                              "started in, so micro-batches shrink unevenly as requests finish.",
            {"stealing": False}, sim_predictor="realistic"),
    Variant("tdpipe-threshold", "TD-Pipe with a fixed switch rule: decode hands back to prefill when fewer than "
                                "half of the phase's requests are still decoding.",
            {"switch_policy": "threshold"}, sim_predictor="realistic"),
    Variant("tdpipe-no-overbook", "TD-Pipe whose greedy prefill never admits past its KV threshold (the "
                                  "paper's admission; ours overbooks where the run's stage times say it pays).",
            {"overbooking": "off"}, sim_predictor="realistic"),
    Variant("tdpipe-fill", "TD-Pipe whose decode micro-batches of few rows also carry chunks of admitted "
                           "prompts, up to 128 tokens with the rows (nearly free while a step is bound by "
                           "reading the weights), so fewer prefill phases are needed.",
            {"decode_fill_tokens": 128}, sim_predictor="realistic"),
    Variant("tdpipe-ahead", "TD-Pipe planning each decode step before the previous one's tokens come back: "
                            "the last stage hands them to stage 0, so the controller's turn-around is off the "
                            "path between decode steps.", {"plan_ahead": True}, sim_predictor="realistic"),
    Variant("tdpipe-no-prefix-cache", "TD-Pipe computing every prompt in full (no prefix caching: a request "
                                      "whose start another computed computes it again).",
            {"prefix_caching": False}, sim_predictor="realistic"),
    Variant("tdpipe-fits", "TD-Pipe admitting requests while their prompts fit in the KV cache free now (no "
                           "output-length prediction): more preemptions when answers grow.", {"admission": "fits"}),
    Variant("hybrid", "Baseline, vLLM-style: every micro-batch mixes prefill chunks with decode steps, one KV "
                      "pool for all micro-batches.", {"policy": "hybrid"}),
    Variant("pp-separate", "Baseline: pipeline with separate batches as vLLM's default scheduler forms them "
                           "(prefill whenever a request fits, else decode; no stealing).", _SEPARATE,
            sim_chunk_tokens=2048),
    Variant("vllm-v0-pp", "Baseline, vLLM v0's pipeline parallelism (the one TD-Pipe measured): one scheduler "
                          "per stage (virtual engine) with 1/pp of the KV cache and of max_num_seqs, requests "
                          "pinned to the least loaded engine, each step all prefill when requests fit, else "
                          "all decode.", {"policy": "vllm-v0-pp"}, sim_chunk_tokens=2048, vllm_v0_host=True),
    Variant("vllm-v1-pp", "Baseline, vLLM v1's pipeline parallelism: one scheduler and KV pool, chunked "
                          "prefill within a token budget, any request not in flight joins the next micro-batch.",
            {"policy": "vllm-v1-pp"}, sim_chunk_tokens=2048),
    Variant("vllm-v1-pp-capped", "vllm-v1-pp with vLLM's fix for uneven micro-batches: at most max_num_seqs / pp "
                                 "sequences per micro-batch.", {"policy": "vllm-v1-pp-capped"}, sim_chunk_tokens=2048),
    Variant("hybrid-throttled", "Baseline, the strongest hybrid we know (after gLLM's token throttling): one KV "
                                "pool, each micro-batch takes 1/pp of the decoding requests and 1/pp of the "
                                "pending prompt tokens, scaled by the free KV share.",
            {"policy": "hybrid-throttled"}, sim_chunk_tokens=2048),
    Variant("naive", "Baseline: static groups; a group is prefilled, decoded until all its requests finish, "
                     "then the next group starts.", {"policy": "naive", "prefill_packing": "fcfs"}, sim_chunk_tokens=2048),
    Variant("tp", "Baseline (simulator only): tensor parallelism over all GPUs with hybrid batches.",
            {"policy": "hybrid"}, parallel="tp", vllm_v0_host=True),
    Variant("tp-separate", "Baseline (simulator only): tensor parallelism with separate batches.", _SEPARATE,
            parallel="tp", sim_chunk_tokens=2048, vllm_v0_host=True),
]}

ENGINE_VARIANTS = [name for name, variant in VARIANTS.items() if variant.in_engine]


def variant(name: str, engine: bool = False) -> Variant:
    """The variant called ``name``; a ValueError lists the names (those the engine runs, with ``engine``)."""
    names = ENGINE_VARIANTS if engine else list(VARIANTS)
    if name not in names:
        where = "the engine's " if engine else ""
        raise ValueError(f"unknown {where}policy variant {name!r}; choose from {', '.join(names)}")
    return VARIANTS[name]


def describe() -> str:
    """The table as text: name, where it runs, options, summary."""
    lines = []
    for v in VARIANTS.values():
        options = ", ".join(f"{k}={val!r}" for k, val in v.options.items()) or "(defaults)"
        lines.append(f"{v.name:<17} {'engine+sim' if v.in_engine else 'sim only':<10} {options}\n"
                     f"{'':<17} {v.summary}")
    return "\n".join(lines)
