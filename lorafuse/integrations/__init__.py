"""Integrations with diffusers pipelines, PEFT layers and LoRA files."""
