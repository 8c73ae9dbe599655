"""Dataset file format, sequence building and batching."""
