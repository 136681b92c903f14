"""scl: Self-Correction Learning for vision-language models, from scratch in PyTorch."""
