"""Fused sweeps (issue 17, in progress): which jobs of a sweep can share one training step."""
