"""VLA policies: the reference VLA, its tokenizer, checkpoints, and the runtime that applies pruning."""
