"""Helpers without model knowledge: atomic files, process groups, progress bars, logs, signals, locks."""
