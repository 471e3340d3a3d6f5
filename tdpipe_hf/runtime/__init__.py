"""Execution only: stages, attention, KV tensors, executors. Never imports controller/ or policies/."""
