"""Megatron checkpoints: tensor layouts, readers, and conversion for serving."""
