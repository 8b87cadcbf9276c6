"""Megatron checkpoints: readers of both formats, records, files, HF export and import, atomic outputs, saving through megatron-core."""
