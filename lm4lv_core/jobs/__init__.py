"""One module per command: its typed job, its checks, and the function its workers run."""
