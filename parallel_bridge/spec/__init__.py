"""The model specification: GPTConfig and its families, the tensors a model has and how parallelism shards them, the TP rule, the Megatron arguments classified, the TensorStore."""
