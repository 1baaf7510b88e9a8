"""Relaxed recursive transformers: a looped shared block with per-loop LoRA (see README.md here)."""
