"""lm4lv: a frozen LLM for low-level vision."""

__version__ = "0.1.0"
