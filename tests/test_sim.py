"""The paper-scale simulator: the virtual clock, the cost model's arithmetic, determinism, and
every real policy finishing every request under a tight simulated KV budget."""

from __future__ import annotations

import json

import pytest

from tdpipe_hf.apps.cli import main
from tdpipe_hf.plan import MicroBatch, SequencePlan
from tdpipe_hf.sim import POLICIES, SimExecutor, SimSetup, sharegpt_like, simulate
from tdpipe_hf.sim.cost import CostModel, Efficiency, SeqShape
from tdpipe_hf.sim.executor import EOS, NOT_EOS
from tdpipe_hf.sim.specs import GPUS, MODELS
from tdpipe_hf.sim.workload import SimRequest

PLAIN = Efficiency(compute=0.5, memory=0.8, layer_overhead=0.0, step_overhead=0.0, link=1.0)


def batch(batch_id, phase, *seqs):
    return MicroBatch(batch_id, phase, [SequencePlan(rid, [7] * new, start, []) for rid, new, start in seqs])


def test_executor_pipelines_batches_on_a_virtual_clock():
    executor = SimExecutor(2, lambda seqs: [1.0, 2.0], transfer=lambda tokens: 0.5)
    executor.expect(0, prompt_len=4, output_len=2)
    executor.expect(1, prompt_len=4, output_len=1)
    executor.submit(batch(0, "prefill", (0, 4, 0)))
    executor.submit(batch(1, "prefill", (1, 4, 0)))
    first, second = executor.collect(), executor.collect()
    # batch 0: stage 0 [0, 1], transfer to 1.5, stage 1 [1.5, 3.5]; batch 1: stage 0 [1, 2], stage 1 waits until 3.5
    compute = [(e[0], e[4], e[5]) for e in first.events + second.events if e[1] == "compute"]
    assert compute == [(0, 0.0, 1.0), (1, 1.5, 3.5), (0, 1.0, 2.0), (1, 3.5, 5.5)]
    assert executor.now == 5.5
    assert first.tokens == {0: NOT_EOS} and second.tokens == {1: EOS}
    executor.submit(batch(2, "decode", (0, 1, 4)))  # enters stage 0 at the clock, not earlier
    assert [e[4] for e in executor.collect().events if e[1] == "compute"] == [5.5, 7.0]


def test_a_step_planned_ahead_enters_stage_0_once_its_tokens_leave_the_last_stage():
    """A decode step sent before the result it follows (``plan_ahead``) waits for that batch to
    leave the last stage, and no longer: the controller's planning time is off the path."""
    wall = [0.0]
    executor = SimExecutor(2, lambda seqs: [1.0, 1.0], measure_host=True, wall_clock=lambda: wall[0])
    executor.expect(0, prompt_len=4, output_len=5)
    first = batch(0, "decode", (0, 1, 4))
    first.forward_tokens = True
    executor.submit(first)
    wall[0] += 0.25  # the controller plans the next step while the first is in the pipeline
    ahead = MicroBatch(1, "decode", [SequencePlan(0, [-1], 5, [], follows=0)])
    executor.submit(ahead)
    assert executor.collect().tokens == {0: NOT_EOS}
    wall[0] += 0.25  # absorbing the first result: off the path, the next step is already running
    result = executor.collect()
    assert [e[4] for e in result.events if e[1] == "compute"] == [2.0, 3.0]
    assert result.tokens == {0: NOT_EOS} and executor.now == 4.0


@pytest.mark.parametrize("measure_host", [False, True])
def test_the_controllers_own_time_moves_the_clock_only_when_measured(measure_host):
    """The wall time spent between getting a result and the next submit (here a fake clock that
    "spends" 50 ms planning) is on the critical path with ``measure_host``; never otherwise."""
    wall = [100.0]
    executor = SimExecutor(1, lambda seqs: [0.001], measure_host=measure_host, wall_clock=lambda: wall[0])
    executor.expect(0, prompt_len=4, output_len=3)
    executor.submit(batch(0, "prefill", (0, 4, 0)))
    executor.collect()
    wall[0] += 0.05  # "planning" the next micro-batch
    executor.submit(batch(1, "decode", (0, 1, 4)))
    wall[0] += 0.05  # host work while the micro-batch runs: it outlasts it
    executor.collect()
    if measure_host:
        assert executor.now == pytest.approx(0.001 + 0.05 + 0.05) and executor.host_seconds == pytest.approx(0.1)
    else:
        assert executor.now == pytest.approx(0.002) and executor.host_seconds == 0.0


def test_per_step_host_work_is_serial_with_each_stage_and_shows_as_a_bubble():
    """vLLM v0-style preparation: each stage's host work starts when the stage is free and the
    micro-batch submitted, hides behind the upstream wait, not behind the stage's own compute."""
    from tdpipe_hf.metrics import bubble_causes, bubble_ratios

    executor = SimExecutor(2, lambda seqs: [1.0, 1.0], stage_host=0.5)
    executor.expect(0, prompt_len=4, output_len=3)
    executor.expect(1, prompt_len=4, output_len=3)
    executor.submit(batch(0, "prefill", (0, 4, 0)))
    executor.submit(batch(1, "prefill", (1, 4, 0)))
    events = executor.collect().events + executor.collect().events
    spans = lambda kind: [(e[0], e[4], e[5]) for e in events if e[1] == kind]  # noqa: E731
    # stage 1 prepares batch 0 while stage 0 runs it; batch 1 waits for each stage to finish batch 0
    assert spans("host") == [(0, 0.0, 0.5), (1, 0.0, 0.5), (0, 1.5, 2.0), (1, 2.5, 3.0)]
    assert spans("compute") == [(0, 0.5, 1.5), (1, 1.5, 2.5), (0, 2.0, 3.0), (1, 3.0, 4.0)]
    causes = bubble_causes(events)
    assert causes["host work before a step"] == pytest.approx(1.0 / 7)  # 0.5 s a stage of 2 x 3.5 s
    assert causes["fill and drain"] == pytest.approx(2.0 / 7) and causes["waits on an upstream stage"] == 0.0
    assert sum(causes.values()) == pytest.approx(sum(bubble_ratios(events)["all"].values()) / 2)
    with pytest.raises(ValueError, match="stage_host must be >= 0"):
        SimExecutor(1, lambda seqs: [1.0], stage_host=-1.0)


def test_vllm_step_cost_slows_only_the_vllm_v0_baselines():
    workload = sharegpt_like(150, seed=3)
    plain, costly = SimSetup.named("llama2-13b", "a100-pcie", 4), SimSetup.named("llama2-13b", "a100-pcie", 4,
                                                                                   vllm_step_cost=0.004)
    for policy in ("vllm-v0-pp", "tp", "tdpipe", "hybrid"):
        before, after = simulate(plain, policy, workload), simulate(costly, policy, workload)
        assert after["finished"] == before["finished"] == 150
        if policy in ("vllm-v0-pp", "tp"):
            assert after["seconds"] > before["seconds"] and after["stage_host_s"] == 0.004
            assert after["bubble_causes"]["host work before a step"] > 0
        else:  # TD-Pipe prepares ahead; the hybrid is our idealised one: neither pays it
            assert after["seconds"] == before["seconds"] and after["stage_host_s"] == 0.0
    forced = simulate(costly, "tdpipe", workload, stage_host=0.004)  # what if TD-Pipe paid it too
    assert forced["seconds"] > simulate(plain, "tdpipe", workload)["seconds"]


def test_decode_step_matches_the_roofline_by_hand():
    model, gpu = MODELS["llama2-13b"], GPUS["l20"]
    cost = CostModel(model, gpu, PLAIN)
    context = 1000
    # one decode token is memory bound: weights and the KV of 1000 tokens per layer, plus the LM head
    layer_bytes = model.layer_params * 2 + context * 2 * model.num_kv_heads * model.head_dim * 2
    expected = (model.num_layers * layer_bytes + model.vocab * model.hidden * 2) / (gpu.memory_bandwidth * 0.8)
    assert cost.stage_time([SeqShape(1, context)], model.num_layers, last=True) == pytest.approx(expected)
    # a long prefill is compute bound: 2 FLOPs per parameter per token plus causal attention
    n = 4096
    flops = model.num_layers * (2 * n * model.layer_params + 4 * n * (n + 1) / 2 * model.hidden) \
        + 2 * model.vocab * model.hidden
    assert cost.stage_time([SeqShape(n, n)], model.num_layers, last=True) == pytest.approx(
        flops / (gpu.peak_flops * 0.5), rel=1e-3)


def test_tensor_parallel_splits_the_work_and_pays_all_reduces():
    cost = CostModel(MODELS["llama2-13b"], GPUS["a100-pcie"], PLAIN)
    seqs = [SeqShape(1, 500)] * 64
    whole = cost.stage_time(seqs, 40, last=True)
    assert cost.tp_time(seqs, 1) == pytest.approx(whole)
    allreduce = cost.allreduce_time(64, 4)
    assert allreduce > 6 * GPUS["a100-pcie"].link_latency
    assert cost.tp_time(seqs, 4) == pytest.approx(whole / 4 + 80 * allreduce)


def test_one_stage_pipeline_takes_its_cost_models_time():
    """One request through a one-stage simulated pipeline: prefill, then one decode step per
    further token, back to back; the virtual clock must equal the sum of the model's times."""
    setup = SimSetup.named("llama2-13b", "l20", 1, efficiency=PLAIN)
    prompt, output = 100, 20
    row = simulate(setup, "tdpipe-fits", [SimRequest(prompt, output)])
    cost = setup.cost
    expected = cost.stage_time([SeqShape(prompt, prompt)], 40, last=True) + sum(
        cost.stage_time([SeqShape(1, prompt + k)], 40, last=True) for k in range(1, output))
    assert row["seconds"] == pytest.approx(expected)
    assert row["generated_tokens"] == output and row["finished"] == 1


def test_simulation_is_deterministic_for_a_seed():
    setup = SimSetup.named("llama2-13b", "l20", 4)
    workload = sharegpt_like(120, seed=3)
    assert workload == sharegpt_like(120, seed=3) and workload != sharegpt_like(120, seed=4)
    assert all(w.prompt_len <= 1024 and w.prompt_len + w.output_len <= 2048 for w in workload)
    first = simulate(setup, "tdpipe", workload, keep_timeline=True)
    second = simulate(setup, "tdpipe", workload, keep_timeline=True)
    for key in ("seconds", "tokens_per_s", "bubble_ratio", "phase_switches"):
        assert first[key] == second[key], key

    def renumbered(timeline):  # batch ids are unique in the process, so each run has its own
        ids = {batch: i for i, batch in enumerate(sorted({event[2] for event in timeline}))}
        return [(stage, kind, ids[batch], *rest) for stage, kind, batch, *rest in timeline]

    assert renumbered(first["timeline"]) == renumbered(second["timeline"])


@pytest.mark.parametrize("policy", list(POLICIES))
def test_every_policy_finishes_every_request_under_a_tight_kv_budget(policy):
    workload = sharegpt_like(40, seed=1, max_prompt=200, max_total=400)
    # 960 tokens for 40 requests; vLLM v0 splits the cache over 4 engines, so it needs 4 x 400
    setup = SimSetup.named("llama2-13b", "l20", 4, kv_blocks=100 if policy == "vllm-v0-pp" else 60)
    row = simulate(setup, policy, workload)
    assert row["finished"] == row["requests"] == 40
    assert row["generated_tokens"] == sum(w.output_len for w in workload)
    assert 0.0 <= row["bubble_ratio"] < 1.0 and row["tokens_per_s"] > 0


def test_tight_budget_forces_preemption_for_the_fits_rule():
    workload = sharegpt_like(40, seed=1, max_prompt=200, max_total=400)
    row = simulate(SimSetup.named("llama2-13b", "l20", 4, kv_blocks=60), "hybrid", workload)
    assert row["preemptions"] > 0  # the budget is tight enough to exercise recompute


def test_kv_budget_comes_from_memory_left_after_weights():
    cost = CostModel(MODELS["llama2-70b"], GPUS["l20"])
    four = cost.kv_blocks([20] * 4, 16)
    assert four > 0
    assert CostModel(MODELS["llama2-70b"], GPUS["l20"]).kv_blocks([80], 16) < 0  # 140 GB on one 48 GB card
    with pytest.raises(ValueError, match="does not fit"):
        simulate(SimSetup.named("llama2-70b", "l20", 1), "tdpipe", [SimRequest(10, 5)])


def test_cli_simulate_writes_rows(tmp_path, capsys):
    out = tmp_path / "rows.json"
    assert main(["simulate", "--model", "llama2-13b", "--gpu", "a100-pcie", "--gpus", "2", "--requests", "30",
                 "--policies", "tdpipe,hybrid,naive,tp", "--out", str(tmp_path / "plots"), "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [r["policy"] for r in rows] == ["tdpipe", "hybrid", "naive", "tp"]
    assert all(r["tokens_per_s"] > 0 and 0 <= r["bubble_ratio"] < 1 for r in rows)
    assert (tmp_path / "plots" / "throughput.png").exists() and (tmp_path / "plots" / "timeline-tdpipe.png").exists()
    assert "| tdpipe | pp |" in capsys.readouterr().out
    assert all(r["host_ms_per_micro_batch"] > 0 for r in rows)  # the default: the scheduler's time counts
    assert main(["simulate", "--policies", "nope", "--requests", "2"]) == 2
    assert main(["simulate", "--host-cost", "soon", "--requests", "2"]) == 2
    assert "--host-cost takes 'measured', 'none' or seconds >= 0, got 'soon'" in capsys.readouterr().err
    assert main(["simulate", "--vllm-step-cost", "-1", "--requests", "2"]) == 2
    assert "--vllm-step-cost takes 'none', 'rfc6854', 'rfc6854-high' or seconds >= 0, got '-1'" in capsys.readouterr().err


def test_bubble_causes_split_each_gap_and_add_up_to_the_bubble():
    from tdpipe_hf.metrics import bubble_causes, bubble_ratios

    timeline = [(0, "compute", 0, "prefill", 0.0, 1.0), (1, "compute", 0, "prefill", 1.0, 2.0),
                (0, "compute", 1, "decode", 2.0, 3.0), (1, "compute", 1, "decode", 3.0, 4.0),  # 1 s switch each
                (0, "compute", 2, "decode", 3.5, 4.0), (1, "compute", 2, "decode", 4.5, 5.0)]  # 0.5 s waits
    causes = bubble_causes(timeline)
    assert causes == pytest.approx({"fill and drain": 0.2, "phase switch": 0.2, "stage 0 waits for the controller": 0.05,
                                    "waits on an upstream stage": 0.05, "host work before a step": 0.0})
    assert sum(causes.values()) == pytest.approx(sum(bubble_ratios(timeline)["all"].values()) / 2)


def test_simulated_rows_break_their_bubble_down():
    setup = SimSetup.named("llama2-13b", "a100-pcie", 4)
    workload = sharegpt_like(200, seed=2)
    for policy in ("tdpipe", "vllm-v0-pp", "hybrid"):
        row = simulate(setup, policy, workload)
        assert sum(row["bubble_causes"].values()) == pytest.approx(row["bubble_ratio"])
        if policy == "tdpipe":  # prefill then decode phases: it pays for switching
            assert row["bubble_causes"]["phase switch"] > 0


def test_the_readme_tables_come_from_the_saved_rows(tmp_path):
    """benchmarks/sim_tables.py renders what `tdpipe simulate --json` wrote, ratios included."""
    import subprocess
    import sys
    from pathlib import Path

    from tdpipe_hf.sim.report import write_json

    setup, workload = SimSetup.named("llama2-13b", "l20", 4), sharegpt_like(60, seed=4)
    rows = [simulate(setup, policy, workload) for policy in ("tdpipe", "vllm-v0-pp", "hybrid", "hybrid-throttled", "tp")]
    write_json(rows, tmp_path / "l20-llama2-13b.json")
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "sim_tables.py"
    printed = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, check=True).stdout
    speed = {r["policy"]: r["tokens_per_s"] for r in rows}
    ratio = speed["tdpipe"] / speed["vllm-v0-pp"]
    line = next(line for line in printed.splitlines() if line.startswith("| L20, Llama-2-13b |"))
    assert f"{speed['tdpipe']:.0f}" in line and f"{ratio:.2f}x" in line
    assert "| L20, Llama-2-13b | tdpipe |" in printed  # the bubble-causes table
