"""vLLM as a peer in ``tdpipe bench``: the same token ids, run by vLLM in its own Python.

vLLM's CPU build pins its own torch and transformers, so it lives in a virtual environment of its
own (``benchmarks/vllm_peer.sh`` builds one). The benchmark writes the chat-templated prompt ids
to a file, starts that environment's Python on a small script, and reads back the generated ids
and the seconds ``LLM.generate`` took (start-up and a warm-up request are outside the timing, as
they are for every other system). vLLM loads a plain HF directory, so a GGUF model is first saved
as one (:func:`export_hf_directory`), with the same dequantised weights our engine runs.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from pathlib import Path

# Run by vLLM's Python: argv = request file, result file. Imports nothing of ours.
_RUNNER = r'''
import json, sys, time


def main():
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    job = json.load(open(sys.argv[1]))
    llm = LLM(model=job["model"], dtype=job["dtype"], enforce_eager=True, max_model_len=job["max_model_len"],
              max_num_seqs=job["max_num_seqs"], seed=0)
    params = SamplingParams(temperature=0.0, max_tokens=job["max_new_tokens"], stop_token_ids=job["eos"],
                            skip_special_tokens=False, detokenize=False)
    prompts = [TokensPrompt(prompt_token_ids=ids) for ids in job["prompts"]]
    llm.generate(prompts[:1], SamplingParams(temperature=0.0, max_tokens=1, detokenize=False), use_tqdm=False)
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    cached = [getattr(o, "num_cached_tokens", None) for o in outputs]  # prompt tokens its prefix cache gave
    json.dump({"seconds": seconds, "outputs": [list(o.outputs[0].token_ids) for o in outputs],
               "cached_tokens": None if None in cached else sum(cached)}, open(sys.argv[2], "w"))


if __name__ == "__main__":  # vLLM starts its engine core with multiprocessing spawn
    main()
'''


def export_hf_directory(model, tokenizer, directory: str | os.PathLike) -> Path:
    """Save ``model`` and ``tokenizer`` as a plain HF directory vLLM can load (a model loaded from
    GGUF forgets its quantisation: the weights saved are the dequantised ones it computes with)."""
    directory = Path(directory)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.architectures = [type(model).__name__]
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def run_vllm(python: str, model_dir: str | os.PathLike, prompts: list[list[int]], max_new_tokens: int,
             eos: set[int], dtype: str = "float32", threads: int | None = None,
             timeout: float = 1800) -> tuple[list[list[int]], float, int | None]:
    """Generate greedily with vLLM under ``python``; returns (generated ids per prompt, seconds,
    prompt tokens vLLM took from its prefix cache, None where it does not say)."""
    if not Path(python).exists():
        raise FileNotFoundError(f"no Python at {python!r}: build vLLM's CPU environment with "
                                "benchmarks/vllm_peer.sh, or pass --vllm-python")
    python = os.path.abspath(python)  # it runs from a scratch directory: a relative path would miss
    model_dir = os.path.abspath(model_dir)  # (abspath, not resolve: a venv's python is a symlink)
    threads = threads or os.cpu_count() or 1
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2"),
           "VLLM_CPU_OMP_THREADS_BIND": os.environ.get("VLLM_CPU_OMP_THREADS_BIND", f"0-{threads - 1}"),
           "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("PYTHONPATH", None)  # vLLM's environment, not ours
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        job = {"model": str(model_dir), "dtype": dtype, "prompts": prompts, "max_new_tokens": max_new_tokens,
               "eos": sorted(eos), "max_model_len": max(len(p) for p in prompts) + max_new_tokens + 16,
               "max_num_seqs": max(len(prompts), 1)}
        (scratch / "job.json").write_text(json.dumps(job))
        (scratch / "runner.py").write_text(_RUNNER)
        done = subprocess.run([python, str(scratch / "runner.py"), str(scratch / "job.json"),
                               str(scratch / "result.json")], env=env, cwd=scratch, timeout=timeout,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if done.returncode != 0:
            tail = "\n".join(done.stdout.splitlines()[-25:])
            raise RuntimeError(f"vLLM exited with code {done.returncode}:\n{tail}")
        result = json.loads((scratch / "result.json").read_text())
    return result["outputs"], result["seconds"], result.get("cached_tokens")
