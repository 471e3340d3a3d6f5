"""The Gradio demo (``tdpipe demo``, ``python demo/app.py``): chat with the TD-Pipe engine, and
run a batch of the bundled prompts under two scheduling policies to compare their pipelines.

The chat tab feeds every user's messages into one ``serving.Server``, so users chatting at the
same time share the engine's micro-batches. The throughput tab runs on a second copy of the
model, so a batch never waits for (or slows the bookkeeping of) the chat server.

gradio is imported inside functions: the package works without it (``pip install
"tdpipe_hf[demo]"`` adds it). Everything runs locally; nothing here contacts the internet.
"""

from __future__ import annotations

import argparse
import atexit
import copy
import itertools
import math
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

from .. import metrics
from ..models import chat_prompt_ids, load_model_and_tokenizer, model_name
from ..variants import ENGINE_VARIANTS, VARIANTS
from .bench import load_prompts

EXECUTOR_HELP = {
    "local": "all stages in this process, one after the other (no real overlap on CPU, but the "
             "schedule and its timeline are the same)",
    "distributed": "one process per stage (cores split between them), activations sent stage to "
                   "stage: stages really overlap; the first run spawns the workers",
}
MAX_NEW_TOKENS_LIMIT = 1024
KV_LIMIT_BYTES = 2 << 30  # the throughput tab's KV budget may not exceed what this many bytes hold


class DemoError(ValueError):
    """Bad input from the UI: shown to the user as a message, never as a stack trace."""


def whole_number(value, name: str, low: int, high: int) -> int:
    """``value`` (from a number box: maybe None, a float, a string) as an int in [low, high]."""
    problem = f"{name} must be a whole number from {low} to {high}, got {value!r}"
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise DemoError(problem) from None
    if not math.isfinite(number) or not number.is_integer() or not low <= number <= high:
        raise DemoError(problem)
    return int(number)


def message_text(content) -> str:
    """The text of a chat message's content: a string (gradio 5) or a list of parts (gradio 6)."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return str(content.get("text", ""))
    if isinstance(content, (list, tuple)):
        return "".join(message_text(part) for part in content)
    return "" if content is None else str(content)


def prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """Chat-templated ids; a tokenizer without a chat template gets plain ``role: text`` lines."""
    if getattr(tokenizer, "chat_template", None):
        return chat_prompt_ids(tokenizer, messages)
    text = "\n".join(f"{m['role']}: {m['content']}" for m in messages) + "\nassistant:"
    return list(tokenizer(text)["input_ids"])


def decode_so_far(tokenizer, ids: list[int]) -> str:
    """Decode the whole answer so far; a character whose bytes have not all arrived is held back."""
    return tokenizer.decode(ids, skip_special_tokens=True).rstrip("\ufffd")


class DemoBackend:
    """The models and engines behind the UI, usable without gradio (the handlers return plain values)."""

    def __init__(self, model_path: str | None = None, stages: int = 1, kv_blocks: int | None = None,
                 max_new_tokens: int = 128, server=None):
        """``server``: chat through this running ``Server`` (e.g. ``tdpipe serve``'s, sharing its
        engine with the HTTP API) instead of wrapping a model of its own."""
        import tdpipe_hf

        from ..config import TDPipeConfig
        from ..runtime.kv_budget import blocks_for_budget
        from .serving import Server

        model, self.tokenizer = load_model_and_tokenizer(model_path)
        self.name = model_name(model)
        self.num_layers = model.config.num_hidden_layers
        whole_number(stages, "--stages", 1, self.num_layers)
        self.max_new_tokens = whole_number(max_new_tokens, "--max-new-tokens", 1, MAX_NEW_TOKENS_LIMIT)
        self.kv_blocks = kv_blocks
        self.context = getattr(model.config, "max_position_embeddings", None)
        self.kv_limit = max(1, blocks_for_budget(model, KV_LIMIT_BYTES, TDPipeConfig.block_size))
        self.owns_server = server is None
        if server is None:
            self.batch_model = copy.deepcopy(model)  # the throughput tab's own copy (cheaper than loading again)
            options = {"kv_blocks": kv_blocks} if kv_blocks else {}
            self.chat_model = tdpipe_hf.wrap(model, num_stages=stages, **options)
            self.server = Server(self.chat_model)
        else:  # the loaded model becomes the throughput tab's; chat goes to the shared engine
            self.batch_model, self.server = model, server
            self.chat_model = server.model
        self.prompts = load_prompts()
        self.prompt_ids = [prompt_ids(self.tokenizer, [{"role": "user", "content": p}]) for p in self.prompts]
        self.batch_lock = threading.Lock()
        self.out_dir = Path(tempfile.mkdtemp(prefix="tdpipe-demo-"))
        atexit.register(shutil.rmtree, self.out_dir, ignore_errors=True)
        self._run_ids = itertools.count()

    def close(self) -> None:
        import tdpipe_hf

        if self.owns_server:
            self.server.close()
            tdpipe_hf.unwrap(self.chat_model)

    # ---- descriptions -------------------------------------------------------------------
    def engine_summary(self) -> str:
        engine = self.chat_model.tdpipe_engine
        cfg = engine.config
        layers = ", ".join(f"{r.start}-{r.stop - 1}" for r in engine.stage_layers)
        return (f"**Model** {self.name} ({self.num_layers} layers). **Chat engine**: {cfg.num_stages} stage(s) "
                f"(layers {layers}), executor {cfg.executor}, policy {cfg.policy}, admission {cfg.admission}, "
                f"switch {cfg.switch_policy}, KV cache {engine.num_blocks} blocks x {cfg.block_size} tokens "
                f"= {engine.kv_capacity_tokens} tokens shared by everyone chatting.")

    @staticmethod
    def describe(policy_a: str, policy_b: str, stages, executor: str) -> str:
        lines = [f"- **{label} = {policy}**: {VARIANTS[policy].summary if policy in VARIANTS else 'unknown policy'}"
                 for label, policy in zip("AB", (policy_a, policy_b))]
        lines.append(f"- **{stages} stage(s)**: the decoder layers are split into that many consecutive groups; "
                     f"with more stages more micro-batches are in flight at once.")
        lines.append(f"- **executor {executor}**: {EXECUTOR_HELP.get(executor, 'unknown executor')}")
        return "\n".join(lines)

    # ---- chat -----------------------------------------------------------------------------
    def chat_prompt(self, history: list[dict], message: str, max_new_tokens: int) -> list[int]:
        """Ids of the conversation plus ``message``; the oldest turns are dropped until the prompt
        and the answer fit both the model's context and the KV cache."""
        room = self.chat_model.tdpipe_engine.request_capacity_tokens
        if self.context:
            room = min(room, self.context)
        room -= max_new_tokens
        if room < 1:
            raise DemoError(f"max new tokens ({max_new_tokens}) leaves no room for the prompt "
                            f"(context and KV cache hold {room + max_new_tokens} tokens); lower it")
        messages = [{"role": m["role"], "content": message_text(m["content"])} for m in history
                    if m.get("role") in ("user", "assistant")]
        messages.append({"role": "user", "content": message})
        while True:
            ids = prompt_ids(self.tokenizer, messages)
            if len(ids) <= room:
                return ids
            if len(messages) == 1:
                raise DemoError(f"the message is too long: {len(ids)} tokens, but only {room} fit "
                                f"beside a {max_new_tokens}-token answer")
            messages = messages[2:] if len(messages) > 2 else messages[1:]

    def chat(self, message: str, history: list[dict] | None, max_new_tokens):
        """Yield ``(history, status)`` as the answer streams in; ``DemoError`` for bad input."""
        message = (message or "").strip()
        if not message:
            raise DemoError("type a message first (it is empty)")
        limit = whole_number(max_new_tokens, "max new tokens", 1, MAX_NEW_TOKENS_LIMIT)
        history = list(history or [])
        ids = self.chat_prompt(history, message, limit)
        start = time.perf_counter()
        try:
            stream = self.server.submit(ids, limit)
        except ValueError as exc:
            raise DemoError(str(exc)) from None
        history += [{"role": "user", "content": message}, {"role": "assistant", "content": ""}]
        tokens: list[int] = []
        for token in stream:
            tokens.append(token)
            history[-1] = {"role": "assistant", "content": decode_so_far(self.tokenizer, tokens)}
            yield history, f"answering: {len(tokens)} tokens ..."
        seconds = time.perf_counter() - start
        history[-1] = {"role": "assistant", "content": self.tokenizer.decode(tokens, skip_special_tokens=True)}
        yield history, (f"answered: {len(tokens)} tokens in {seconds:.1f} s ({len(tokens) / seconds:.1f} tokens/s), "
                        f"finish reason {stream.finish_reason}; prompt {len(ids)} tokens. The engine has "
                        f"generated {self.server.stats.generated_tokens} tokens for all users so far.")

    # ---- throughput ---------------------------------------------------------------------
    def check_batch(self, n, max_new_tokens, stages, executor, policy_a, policy_b, kv_blocks) -> dict:
        """The batch settings as clean values, or ``DemoError`` naming the bad one."""
        for label, policy in (("policy A", policy_a), ("policy B", policy_b)):
            if policy not in ENGINE_VARIANTS:
                raise DemoError(f"{label} {policy!r} is unknown; choose one of {', '.join(ENGINE_VARIANTS)}")
        if executor not in EXECUTOR_HELP:
            raise DemoError(f"executor {executor!r} is unknown; choose local or distributed")
        settings = {
            "n": whole_number(n, "number of prompts", 1, len(self.prompts)),
            "max_new_tokens": whole_number(max_new_tokens, "max new tokens", 1, MAX_NEW_TOKENS_LIMIT),
            "stages": whole_number(stages, "stage count", 1, self.num_layers),
            "executor": executor, "policies": (policy_a, policy_b), "kv_blocks": None,
        }
        if kv_blocks not in (None, "", 0):  # 0 or empty: the engine sizes the cache from free memory
            settings["kv_blocks"] = whole_number(kv_blocks, "KV blocks (empty: automatic)", 1, self.kv_limit)
        return settings

    def run_batch(self, settings: dict, announce=None) -> dict:
        """Run the batch under both policies (one after the other, same prompts); plots and a table."""
        *_, result = self.run_batch_steps(settings, announce)
        return result

    def run_batch_steps(self, settings: dict, announce=None):
        """``run_batch`` as it goes: yields the result so far (runs done, their timelines, the KV
        plot and table of those) after each policy, so the UI shows run A while B runs.
        ``announce(text)`` is told which run starts (the UI's progress line)."""
        runs = []
        run_id = next(self._run_ids)
        with self.batch_lock:
            for label, policy in zip("AB", settings["policies"]):
                if announce is not None:
                    announce(f"run {label}: {policy}, {settings['n']} prompts")
                run = self._run_policy(policy, settings)
                run["timeline_png"] = None
                if run["stats"].timeline:
                    path = self.out_dir / f"timeline-{run_id}-{label}.png"
                    metrics.plot_timeline(run["stats"].timeline, path,
                                          f"{label}: {run['policy']}, {settings['stages']} stage(s), "
                                          f"{run['tokens_per_s']:.1f} tokens/s")
                    run["timeline_png"] = str(path)
                runs.append(run)
                kv_png = self.out_dir / f"kv-{run_id}-{len(runs)}.png"
                plot_kv(runs, kv_png)
                yield {"runs": list(runs), "kv_png": str(kv_png), "table": results_table(runs)}

    def _run_policy(self, policy: str, settings: dict) -> dict:
        import tdpipe_hf

        options = dict(VARIANTS[policy].options, executor=settings["executor"])
        if settings["kv_blocks"]:
            options["kv_blocks"] = settings["kv_blocks"]
        model = tdpipe_hf.wrap(self.batch_model, num_stages=settings["stages"], **options)
        try:
            ids = self.prompt_ids[:settings["n"]]
            longest = max(len(p) for p in ids) + settings["max_new_tokens"]
            if longest > model.tdpipe_engine.request_capacity_tokens:
                raise DemoError(f"the KV cache ({model.tdpipe_engine.request_capacity_tokens} tokens) is smaller than "
                                f"the longest prompt plus max new tokens ({longest}); raise KV blocks or lower "
                                f"max new tokens")
            model.generate_batch(ids[:1], max_new_tokens=1)  # starts distributed workers outside the timing
            start = time.perf_counter()
            outputs = model.generate_batch(ids, max_new_tokens=settings["max_new_tokens"], do_sample=False,
                                           progress_bar=True)  # gr.Progress(track_tqdm=True) shows this bar
            seconds = time.perf_counter() - start
            engine = model.tdpipe_engine
            config = engine.config
            effective = (f"{policy}: {config.num_stages} stage(s) (layers "
                         f"{', '.join(f'{r.start}-{r.stop - 1}' for r in engine.stage_layers)}), executor "
                         f"{config.executor}, policy {config.policy}, admission {config.admission}, stealing "
                         f"{config.stealing}, switch {config.switch_policy}, KV {engine.num_blocks} blocks x "
                         f"{config.block_size} tokens")
            stats = engine.last_stats
        finally:
            tdpipe_hf.unwrap(self.batch_model)
        generated = sum(len(o) for o in outputs)
        return {"policy": policy, "stats": stats, "seconds": seconds, "generated": generated,
                "tokens_per_s": generated / seconds if seconds > 0 else 0.0, "effective": effective}


def results_table(runs: list[dict]) -> str:
    rows = ["| run | policy | tokens | seconds | tokens/s | preemptions | phase switches | mean KV use "
            "| bubble (whole run, mean of stages) |",
            "|---|---|---|---|---|---|---|---|---|"]
    details = []
    for label, run in zip("AB", runs):
        stats = run["stats"]
        bubbles = metrics.bubble_ratios(stats.timeline)
        overall = bubbles.get("all", {})
        mean_bubble = f"{sum(overall.values()) / len(overall):.1%}" if overall else "-"
        kv = metrics.mean_kv_utilisation(stats.kv_used, stats.kv_blocks)
        rows.append(f"| {label} | {run['policy']} | {run['generated']} | {run['seconds']:.2f} | "
                    f"{run['tokens_per_s']:.1f} | {stats.preemptions} | {stats.phase_switches} | {kv:.0%} | "
                    f"{mean_bubble} |")
        details.append(f"- **{label}** {metrics.format_bubbles(bubbles) if bubbles else 'no timeline'}")
        details.append(f"- **{label} engine**: {run['effective']}")
    return "\n".join(rows) + "\n\n" + "\n".join(details)


def plot_kv(runs: list[dict], path: Path) -> None:
    """Both runs' KV cache use over time (share of the budget), on one chart."""
    from matplotlib.figure import Figure  # no pyplot: safe beside other threads

    fig = Figure(figsize=(12, 3))
    ax = fig.add_subplot()
    for label, run in zip("AB", runs):
        samples = run["stats"].kv_used
        if not samples:
            continue
        origin = samples[0][0]
        blocks = max(run["stats"].kv_blocks, 1)
        ax.step([t - origin for t, _ in samples], [100 * used / blocks for _, used in samples], where="post",
                label=f"{label}: {run['policy']} ({run['stats'].kv_blocks} blocks)")
    ax.set_xlabel("seconds")
    ax.set_ylabel("KV blocks in use (%)")
    ax.set_ylim(0, 105)
    ax.set_title("KV cache use")
    ax.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


# ---- the gradio app ------------------------------------------------------------------------
def build_app(backend: DemoBackend):
    """The gr.Blocks of the demo, queue enabled (needed for streaming and progress)."""
    import gradio as gr

    def shown(text: str):
        return gr.update(value=f"**Error:** {text}", visible=True)

    def hidden():
        return gr.update(value="", visible=False)

    def on_chat(message, history, max_new_tokens):
        history = history or []
        try:
            for new_history, status in backend.chat(message, history, max_new_tokens):
                yield new_history, "", status, hidden()
        except DemoError as exc:
            gr.Warning(str(exc), duration=5)
            yield history, message, "", shown(str(exc))
        except Exception as exc:  # engine failure: tell the user, keep serving
            yield history, message, "", shown(f"the engine failed: {type(exc).__name__}: {exc}")

    def on_batch(n, max_new_tokens, stages, executor, policy_a, policy_b, kv_blocks,
                 progress=gr.Progress(track_tqdm=True)):
        try:
            settings = backend.check_batch(n, max_new_tokens, stages, executor, policy_a, policy_b, kv_blocks)
            for result in backend.run_batch_steps(settings, announce=lambda text: progress(0, desc=text)):
                runs = result["runs"]
                second = runs[1]["timeline_png"] if len(runs) > 1 else None
                yield hidden(), runs[0]["timeline_png"], second, result["kv_png"], result["table"]
        except DemoError as exc:
            gr.Warning(str(exc), duration=5)
            yield shown(str(exc)), None, None, None, ""
        except Exception as exc:
            yield shown(f"the run failed: {type(exc).__name__}: {exc}"), None, None, None, ""

    policies = list(ENGINE_VARIANTS)
    with gr.Blocks(title="tdpipe_hf demo", analytics_enabled=False) as demo:
        gr.Markdown("# tdpipe_hf: TD-Pipe pipelined inference\n" + backend.engine_summary())
        with gr.Tab("Chat"):
            gr.Markdown("Answers stream from the TD-Pipe engine. Everyone chatting shares one engine: "
                        "messages sent at the same time are batched together.")
            chatbot = gr.Chatbot(label="chat", elem_id="chatbot", height=420)
            with gr.Row():
                message = gr.Textbox(label="message", placeholder="Ask something and press Enter",
                                     elem_id="chat-input", scale=5)
                send = gr.Button("Send", variant="primary", elem_id="chat-send", scale=1)
            chat_tokens = gr.Slider(1, MAX_NEW_TOKENS_LIMIT, value=backend.max_new_tokens, step=1,
                                    label="max new tokens per answer", elem_id="chat-max-tokens")
            chat_status = gr.Markdown(elem_id="chat-status")
            chat_error = gr.Markdown(visible=False, elem_id="chat-error")
            clear = gr.Button("Clear conversation", elem_id="chat-clear")
            chat_io = dict(fn=on_chat, inputs=[message, chatbot, chat_tokens],
                           outputs=[chatbot, message, chat_status, chat_error], concurrency_limit=32)
            message.submit(**chat_io)
            send.click(**chat_io)
            clear.click(lambda: ([], "", hidden()), outputs=[chatbot, chat_status, chat_error])
        with gr.Tab("Throughput"):
            gr.Markdown(f"Run the first N of the {len(backend.prompts)} bundled prompts as one batch under "
                        "two scheduling policies, one after the other on the same prompts (greedy), and "
                        "compare tokens/s, the per-stage timelines (prefill orange, decode blue, gaps are "
                        "bubbles) and KV cache use.")
            with gr.Row():
                # defaults that finish in about half a minute on 2 CPU cores (both runs)
                n = gr.Number(value=min(8, len(backend.prompts)), label=f"prompts (1-{len(backend.prompts)})",
                              elem_id="batch-n")
                batch_tokens = gr.Number(value=min(48, backend.max_new_tokens),
                                         label=f"max new tokens (1-{MAX_NEW_TOKENS_LIMIT})", elem_id="batch-tokens")
                stages = gr.Number(value=min(2, backend.num_layers), label=f"stages (1-{backend.num_layers})",
                                   elem_id="batch-stages")
                kv_blocks = gr.Number(value=backend.kv_blocks, label=f"KV blocks (0: automatic; max {backend.kv_limit}; "
                                                                     "small budgets set policies apart)",
                                      elem_id="batch-kv")
            with gr.Row():
                policy_a = gr.Dropdown(policies, value="tdpipe", label="policy A", elem_id="policy-a")
                policy_b = gr.Dropdown(policies, value="hybrid", label="policy B", elem_id="policy-b")
                executor = gr.Radio(list(EXECUTOR_HELP), value="local", label="executor", elem_id="executor")
            settings_text = gr.Markdown(backend.describe("tdpipe", "hybrid", min(2, backend.num_layers), "local"),
                                        elem_id="batch-settings")
            run = gr.Button("Run batch", variant="primary", elem_id="batch-run")
            batch_error = gr.Markdown(visible=False, elem_id="batch-error")
            table = gr.Markdown(elem_id="batch-table")
            # One above the other at full width: the stage lanes stay readable and line up.
            timeline_a = gr.Image(label="timeline A", type="filepath", elem_id="timeline-a")
            timeline_b = gr.Image(label="timeline B", type="filepath", elem_id="timeline-b")
            kv_plot = gr.Image(label="KV cache use", type="filepath", elem_id="kv-plot")
            for control in (policy_a, policy_b, stages, executor):
                control.change(backend.describe, inputs=[policy_a, policy_b, stages, executor],
                               outputs=settings_text)
            run.click(on_batch, inputs=[n, batch_tokens, stages, executor, policy_a, policy_b, kv_blocks],
                      outputs=[batch_error, timeline_a, timeline_b, kv_plot, table], concurrency_limit=1,
                      show_progress_on=[table])  # one progress bar, not one per output
    demo.queue()
    return demo


def serve(model: str | None = None, host: str = "127.0.0.1", port: int | None = None, stages: int = 1,
          kv_blocks: int | None = None, max_new_tokens: int = 128, share: bool = False,
          block: bool = True):
    """Load the model, build the app and launch it; with ``block`` serve until Ctrl-C."""
    if model is not None and not Path(model).exists():
        raise FileNotFoundError(f"model {model} does not exist (give an HF model directory or a .gguf file)")
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no analytics or version check requests
    print(f"loading {model or 'the default model'} ...", file=sys.stderr)
    backend = DemoBackend(model, stages=stages, kv_blocks=kv_blocks, max_new_tokens=max_new_tokens)
    demo = build_app(backend)
    demo.launch(server_name=host, server_port=port, share=share, ssr_mode=False, prevent_thread_lock=not block)
    if block:
        backend.close()
    return demo, backend


def parser() -> argparse.ArgumentParser:
    from .cli import add_demo_arguments

    parser = argparse.ArgumentParser(description="Gradio demo of tdpipe_hf: chat, and policy comparison.")
    add_demo_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        serve(args.model, args.host, args.port, args.stages, args.kv_blocks, args.max_new_tokens, args.share)
    except (ValueError, FileNotFoundError) as exc:
        print(f"tdpipe demo: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
