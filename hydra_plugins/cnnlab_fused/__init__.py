"""cnnlab's Hydra plugins: `hydra/launcher=fused` (fused sweeps, cnnlab/fused/)."""
