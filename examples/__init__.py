"""Runnable examples of peft-twins; start with ``python -m examples.finetune_roundtrip``."""
