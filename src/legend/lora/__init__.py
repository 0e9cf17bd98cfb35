"""Adapter layouts (depth, per-block ranks, trainable tensors) and their PEFT injection."""

from legend.lora.layout import AdapterLayout, inject_lora

__all__ = ["AdapterLayout", "inject_lora"]
