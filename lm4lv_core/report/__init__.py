"""Reports a person opens in a browser: the comparison page of ``lm4lv eval --html`` (and the
quickstart), the training run's ``report.html``, and the ceiling (a vision family's own
reconstruction of the ground truth)."""
