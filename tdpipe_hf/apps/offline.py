"""Offline batch jobs: a JSONL file of prompts in, a JSONL file of answers out, resumable.

Input lines are ``{"prompt": ...}``, ``{"messages": [...]}`` or OpenAI batch-API requests
(``{"custom_id", "method", "url", "body": {"messages", "max_tokens"}}``). Each finished request
is appended to the output as one line written with a single ``write`` and flushed (fsynced at
most every second), so a crash loses only requests still in flight and a rerun skips every id
already in the output. Bad lines go to an errors file with their line numbers; the job goes on.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ..controller import Request
from ..controller.controller import RunStats
from ..mixin import eos_token_ids
from ..models import chat_prompt_ids, check_text, normalize_messages
from ..models import model_name as model_name_of

FSYNC_SECONDS = 1.0
CHAT_URL = "/v1/chat/completions"


@dataclass
class Job:
    """One input line, parsed."""

    line: int
    id: str
    messages: list[dict] | None
    prompt: str | None
    max_new_tokens: int | None
    openai: bool = False

    @property
    def fingerprint(self) -> str:
        """A short hash of what decides the answer, kept with it: a rerun on another input whose
        ids collide (two files both numbered ``line-N``) is told, not handed the old answers."""
        what = json.dumps([self.messages, self.prompt, self.max_new_tokens], ensure_ascii=False, sort_keys=True)
        return hashlib.sha256(what.encode("utf-8", "surrogatepass")).hexdigest()[:16]


@dataclass
class JobSummary:
    requests: int = 0
    skipped: int = 0  # already in the output from an earlier run
    errors: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    seconds: float = 0.0
    preemptions: int = 0
    cached_tokens: int = 0  # prompt tokens taken from the prefix cache
    kv_utilisation: float = 0.0
    bubble: dict = field(default_factory=dict)

    @property
    def tokens_per_s(self) -> float:
        return self.generated_tokens / self.seconds if self.seconds else 0.0

    def format(self) -> str:
        text = (f"{self.requests} requests done ({self.skipped} already in the output, {self.errors} bad lines), "
                f"{self.generated_tokens} tokens generated in {self.seconds:.1f}s: {self.tokens_per_s:.1f} tokens/s, "
                f"{self.preemptions} preemptions, {self.cached_tokens} prompt tokens from the prefix cache, "
                f"mean KV use {100 * self.kv_utilisation:.0f} %")
        if self.bubble:
            from ..metrics import format_bubbles

            text += f"; {format_bubbles(self.bubble)}"
        return text


class BadLine(ValueError):
    """What is wrong with an input line; ``id`` is the line's id when it has a readable one."""

    def __init__(self, message: str, job_id: str | None = None):
        super().__init__(message)
        self.id = job_id


def parse_line(text: str, line: int) -> Job:
    """A Job from one JSONL line; ``BadLine`` says what is wrong with it."""
    try:
        record = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BadLine(f"not valid JSON: {exc.msg} (column {exc.colno})") from None
    if not isinstance(record, dict):
        raise BadLine("a line must be a JSON object")
    job_id = _line_id(record)
    try:
        return _job(record, line, job_id)
    except BadLine as exc:  # the report names the line's id when it has one
        exc.id = job_id
        raise


def _line_id(record: dict) -> str | None:
    """An OpenAI batch line's ``custom_id``, another line's ``id`` (either, failing that), or None."""
    for key in ("custom_id", "id") if "body" in record else ("id", "custom_id"):
        if record.get(key) is not None:  # "id": null is no id
            return str(record[key])
    return None


def _job(record: dict, line: int, job_id: str | None) -> Job:
    if "body" in record:
        body = record.get("body")
        if not isinstance(body, dict) or "custom_id" not in record:
            raise BadLine("an OpenAI batch line needs 'custom_id' and a 'body' object")
        if record.get("url", CHAT_URL) != CHAT_URL:
            raise BadLine(f"only {CHAT_URL} batch lines are answered, not {record.get('url')!r}")
        if body.get("n", 1) != 1:
            raise BadLine(f"'n' must be 1 (one answer a line), got {body.get('n')!r}")
        messages = body.get("messages")
        if messages is None:
            raise BadLine("an OpenAI batch line's body needs 'messages'")
        limit = body.get("max_completion_tokens", body.get("max_tokens"))
        openai = True
        prompt = None
    else:
        job_id = job_id or f"line-{line}"
        messages, prompt, openai = record.get("messages"), record.get("prompt"), False
        limit = record.get("max_new_tokens", record.get("max_tokens"))
        if messages is None and prompt is None:
            raise BadLine("a line needs 'prompt', 'messages' or an OpenAI batch 'body'")
    if messages is not None:
        try:
            messages = normalize_messages(messages)
        except ValueError as exc:
            raise BadLine(str(exc)) from None
        if not any(m["content"].strip() for m in messages):
            raise BadLine("empty prompt: the messages have no content")
    elif not isinstance(prompt, str):
        raise BadLine(f"'prompt' must be a string, got {type(prompt).__name__}")
    elif not prompt.strip():
        raise BadLine("empty prompt")
    else:
        try:
            check_text("'prompt'", prompt)
        except ValueError as exc:
            raise BadLine(str(exc)) from None
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
        raise BadLine(f"max tokens must be a positive integer, got {limit!r}")
    return Job(line, job_id, messages, prompt, limit, openai)


def read_jobs(input_path: str | Path) -> Iterator[tuple[int, Job | BadLine]]:
    """Every non-blank line of a job file with its line number: a Job, or the BadLine saying what
    is wrong with it."""
    with open(input_path, "rb") as lines:  # bytes: one badly encoded line must not stop the job
        for number, raw in enumerate(lines, 1):
            if raw.strip():
                try:
                    yield number, parse_line(decode_line(raw), number)
                except BadLine as exc:
                    yield number, exc


TO_ANSWER, ANSWERED = "", "answered"  # screen_jobs' verdicts besides an error message


def screen_jobs(input_path: Path, finished: dict[str, str | None], output_path: Path) -> Iterator[tuple]:
    """Every line of a job file as ``(number, job, verdict)``: ``TO_ANSWER``, ``ANSWERED`` (its
    answer for the same prompt is in the output) or the message for the errors file. The first
    line with an id owns it, in every run."""
    seen: set[str] = set()
    for number, job in read_jobs(input_path):
        if isinstance(job, BadLine):
            yield number, job, str(job)
        elif job.id in seen:
            yield number, job, f"duplicate id {job.id!r}"
        else:
            seen.add(job.id)
            if job.id not in finished:
                yield number, job, TO_ANSWER
            elif finished[job.id] in (None, job.fingerprint):
                yield number, job, ANSWERED
            else:
                yield number, job, (f"id {job.id!r} is answered in {output_path} for another prompt (an "
                                    "earlier run on another input?); choose another output file, or delete "
                                    "that answer to redo it")


def decode_line(raw: bytes) -> str:
    """A job file's line as text; ``BadLine`` names the first byte that is not UTF-8."""
    raw = raw.removeprefix(b"\xef\xbb\xbf")  # a byte-order mark some editors put first
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadLine(f"not valid UTF-8: byte 0x{raw[exc.start]:02x} at column {exc.start + 1}") from None


def answer_lengths(output: str | Path) -> dict[str, int]:
    """Generated tokens per answered id of a ``run_batch`` output (plain or OpenAI shape)."""
    lengths = {}
    with open(output, encoding="utf-8") as handle:
        for raw in handle:
            if raw.strip():
                record = json.loads(raw)
                usage = record["response"]["body"]["usage"] if "custom_id" in record else record
                lengths[str(record.get("custom_id", record.get("id")))] = int(usage["completion_tokens"])
    return lengths


def done_ids(output: Path) -> dict[str, str | None]:
    """Ids already answered in ``output``, each with its prompt's fingerprint (None in answers of
    OpenAI batch lines and of older versions). A torn last line (crash mid-write) is cut off, but
    only once every whole line has proved to be an answer: any other file is left as it is."""
    if not output.exists():
        return {}
    with open(output, "rb+") as handle:
        data = handle.read()
        whole = data[:data.rfind(b"\n") + 1]
        ids = {}
        for number, raw in enumerate(whole.splitlines(), 1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
            except ValueError:
                record = None
            answer_id = record.get("custom_id", record.get("id")) if isinstance(record, dict) else None
            if answer_id is None:
                raise ValueError(f"{output} is not an answers file of tdpipe run (line {number} is not an "
                                 "answer); choose another output file")
            ids[str(answer_id)] = record.get("prompt_hash")
        if len(whole) < len(data):
            handle.truncate(len(whole))
    return ids


def check_paths(input_path: Path, output_path: Path, errors_path: Path) -> None:
    """A ValueError naming the problem if the job's files cannot be what they are meant to be:
    checked before the model loads, so a typo costs no minutes."""
    if output_path.exists() and output_path.resolve() == input_path.resolve():
        raise ValueError(f"the output {output_path} is the input file; choose another output file")
    if errors_path.exists() and errors_path.resolve() in (input_path.resolve(), output_path.resolve()):
        raise ValueError(f"the errors file {errors_path} is the input or the output file; choose another")
    for what, path in (("output", output_path), ("errors file", errors_path)):
        if path.is_dir():
            raise ValueError(f"the {what} {path} is a folder; give a file name")
        if not path.parent.is_dir():
            raise ValueError(f"the {what}'s folder {path.parent} does not exist")


def errors_path_for(output_path: Path, errors_path: str | Path | None) -> Path:
    return Path(errors_path) if errors_path else output_path.with_name(output_path.name + ".errors.jsonl")


class _Appender:
    """Appends whole lines; flushes each, fsyncs at most every ``FSYNC_SECONDS``."""

    def __init__(self, path: Path):
        self.handle = open(path, "a", encoding="utf-8")
        try:  # two runs appending to one file would answer every request twice
            fcntl.flock(self.handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.handle.close()
            raise ValueError(f"{path} is being written by another tdpipe run; wait for it, or choose another "
                             "output file") from None
        except OSError:  # a file system without locks: run unguarded rather than not at all
            pass
        self.last_sync = time.monotonic()

    def write(self, record: dict) -> None:
        self.handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.handle.flush()
        if time.monotonic() - self.last_sync > FSYNC_SECONDS:
            os.fsync(self.handle.fileno())
            self.last_sync = time.monotonic()

    def close(self) -> None:
        self.handle.flush()
        os.fsync(self.handle.fileno())
        self.handle.close()


def run_batch(model, tokenizer, input_path: str | Path, output_path: str | Path, errors_path: str | Path | None = None,
              max_new_tokens: int = 256, progress: bool = True, chat_template: bool = True,
              lookahead: int = 1024, model_name: str | None = None) -> JobSummary:
    """Answer every line of ``input_path`` into ``output_path`` with a wrapped model (see module doc).

    ``errors_path`` defaults to ``OUTPUT.errors.jsonl`` and is rewritten by every run. Prompts
    (``"prompt"`` lines too) go through the tokenizer's chat template unless ``chat_template`` is
    False or the tokenizer has none. Returns the summary of this run.
    """
    from ..metrics import bubble_ratios, mean_kv_utilisation

    engine = getattr(model, "tdpipe_engine", None)
    if engine is None:
        raise TypeError("run_batch needs a model wrapped with tdpipe_hf.wrap (or tdpipe_hf.from_pretrained)")
    input_path, output_path = Path(input_path), Path(output_path)
    errors_path = errors_path_for(output_path, errors_path)
    check_paths(input_path, output_path, errors_path)
    out = _Appender(output_path)  # holds the output's lock from here on
    try:
        finished = done_ids(output_path)
        verdicts = Counter(verdict for _, _, verdict in screen_jobs(input_path, finished, output_path)
                           if verdict in (TO_ANSWER, ANSWERED))  # a first pass, for the progress bar
    except BaseException:
        out.close()
        raise
    summary = JobSummary(skipped=verdicts[ANSWERED])
    eos = eos_token_ids(model.generation_config)
    context = getattr(model.config, "max_position_embeddings", None)
    use_template = chat_template and getattr(tokenizer, "chat_template", None) is not None
    model_name = model_name or model_name_of(model)
    pending: dict[int, tuple[Job, int]] = {}
    errors = open(errors_path, "w", encoding="utf-8")

    def report(line: int, job_id: str | None, message: str) -> None:
        summary.errors += 1
        errors.write(json.dumps({"line": line, "id": job_id, "error": message}, ensure_ascii=False) + "\n")
        errors.flush()

    def requests() -> Iterator[Request]:
        for number, job, verdict in screen_jobs(input_path, finished, output_path):
            if verdict == ANSWERED:
                continue
            if verdict != TO_ANSWER:
                report(number, job.id, verdict)
                continue
            try:
                ids = tokenize_job(tokenizer, job, use_template)
            except Exception as exc:  # e.g. a chat template that refuses the roles: this line only
                report(number, job.id, f"could not tokenize: {type(exc).__name__}: {exc}")
                continue
            limit = job.max_new_tokens or max_new_tokens
            problem = _size_problem(len(ids), limit, context, engine.request_capacity_tokens)
            if problem:
                report(number, job.id, problem)
                continue
            pending[number] = (job, len(ids))
            yield Request(request_id=number, prompt_ids=ids, max_new_tokens=limit, eos_token_ids=eos)

    def on_finish(request: Request) -> None:
        job, prompt_len = pending.pop(request.request_id)
        text = tokenizer.decode(request.output_ids, skip_special_tokens=True)
        reason = "stop" if request.finish_reason == "stop" else "length"
        out.write(_answer(job, text, prompt_len, len(request.output_ids), reason, model_name))
        summary.requests += 1
        summary.prompt_tokens += prompt_len
        summary.generated_tokens += len(request.output_ids)

    start = time.perf_counter()
    try:
        stats: RunStats = engine.run_stream(requests(), on_finish=on_finish, progress=progress,
                                            total=verdicts[TO_ANSWER], description="tdpipe run",
                                            lookahead=lookahead)
    finally:
        out.close()
        errors.close()
    summary.seconds = time.perf_counter() - start
    summary.preemptions = stats.preemptions
    summary.cached_tokens = stats.cached_tokens
    summary.kv_utilisation = mean_kv_utilisation(stats.kv_used, stats.kv_blocks)
    summary.bubble = bubble_ratios(stats.timeline) if engine.config.num_stages > 1 else {}
    return summary


def tokenize_job(tokenizer, job: Job, use_template: bool) -> list[int]:
    messages = job.messages if job.messages is not None else [{"role": "user", "content": job.prompt}]
    if use_template:
        return chat_prompt_ids(tokenizer, messages)
    text = job.prompt if job.prompt is not None else "\n".join(str(m["content"]) for m in messages)
    return tokenizer(text)["input_ids"]


def _size_problem(prompt_len: int, limit: int, context: int | None, capacity: int) -> str | None:
    if context is not None and prompt_len > context:
        return f"prompt has {prompt_len} tokens, more than the model's context of {context}"
    if prompt_len + limit > capacity:
        return (f"prompt ({prompt_len} tokens) + max new tokens ({limit}) exceeds the KV budget of {capacity} "
                "tokens; raise kv_blocks/kv_cache_bytes or lower max tokens")
    return None


def _answer(job: Job, text: str, prompt_tokens: int, completion_tokens: int, reason: str, model: str) -> dict:
    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
             "total_tokens": prompt_tokens + completion_tokens}
    if not job.openai:
        return {"id": job.id, "text": text, **usage, "finish_reason": reason, "prompt_hash": job.fingerprint}
    body = {"object": "chat.completion", "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": reason}],
            "usage": usage}
    return {"id": f"batch_req_{job.line}", "custom_id": job.id,
            "response": {"status_code": 200, "request_id": f"req_{job.line}", "body": body}, "error": None}
