"""Kernels behind switches, each with a plain-PyTorch reference: attention, fused glue, loss."""
