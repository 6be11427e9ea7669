"""Fused sweeps (hydra/launcher=fused): a sweep's jobs that can share a step train as one wide model."""
