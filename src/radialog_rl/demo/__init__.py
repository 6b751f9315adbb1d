"""Demos on the built-in tiny release (``radialog-rl demo ...``)."""
