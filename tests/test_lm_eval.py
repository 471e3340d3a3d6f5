"""lm-evaluation-harness runs on the wrapped model: its Hugging Face backend, handed the wrapped
model object, gives the same answers as on the plain model, and its OpenAI-compatible chat
backend runs against `tdpipe serve`. The task is defined from a local file: nothing is
downloaded."""

from __future__ import annotations

import json

import pytest

lm_eval = pytest.importorskip("lm_eval")

import tdpipe_hf  # noqa: E402

QUESTIONS = [("What is the capital of France?", "Paris"), ("How many legs does a spider have?", "Eight"),
             ("What colour is the sky on a clear day?", "Blue"), ("What is 3 + 4?", "7"),
             ("Which planet is known as the Red Planet?", "Mars")]
TASK = "tdpipe_local_qa"


@pytest.fixture
def task_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps({"question": f"Q: {q}\nA:", "answer": f" {a}"}) + "\n" for q, a in QUESTIONS))
    (tmp_path / "task.yaml").write_text(f"""task: {TASK}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 12
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
""")
    return tmp_path


def answers(results) -> list:
    return [sample["resps"] for sample in results["samples"][TASK]]


def test_hf_backend_on_the_wrapped_model_answers_as_the_plain_model(smollm2, task_dir):
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    model, tokenizer = smollm2
    tasks = TaskManager(include_path=str(task_dir))

    def evaluate():  # batches of 3: lm-eval's stop sequences then decide for a whole batch at once
        return lm_eval.simple_evaluate(model=HFLM(pretrained=model, tokenizer=tokenizer, batch_size=3),
                                       tasks=[TASK], task_manager=tasks, log_samples=True)

    plain = evaluate()
    tdpipe_hf.wrap(model, num_stages=2, kv_blocks=200)
    try:
        wrapped = evaluate()
    finally:
        tdpipe_hf.unwrap(model)
    assert answers(wrapped) == answers(plain)
    assert len(answers(plain)) == len(QUESTIONS) and all(a[0][0].strip() for a in answers(plain))


def test_openai_chat_backend_against_tdpipe_serve(smollm2, task_dir):
    pytest.importorskip("uvicorn")
    from lm_eval.tasks import TaskManager

    from tdpipe_hf.apps.openai_server import build_app, running_in_thread

    model, tokenizer = smollm2
    tdpipe_hf.wrap(model, num_stages=1, kv_blocks=200)
    try:
        with running_in_thread(build_app(model, tokenizer, "smol")) as base:
            results = lm_eval.simple_evaluate(
                model="local-chat-completions", apply_chat_template=True, log_samples=True,
                model_args=f"model=smol,base_url={base}/v1/chat/completions,num_concurrent=5,"
                           "max_retries=1,tokenized_requests=False",
                tasks=[TASK], task_manager=TaskManager(include_path=str(task_dir)))
        served = answers(results)
        expected = []
        for question, _ in QUESTIONS:  # what the server answers is greedy generate on the chat prompt
            ids = tokenizer.apply_chat_template([{"role": "user", "content": f"Q: {question}\nA:"}],
                                                add_generation_prompt=True, tokenize=True, return_dict=False)
            import torch
            out = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)
            expected.append(tokenizer.decode(out[0, len(ids):], skip_special_tokens=True).split("\n")[0])
    finally:
        tdpipe_hf.unwrap(model)
    assert [a[0][0] for a in served] == expected
