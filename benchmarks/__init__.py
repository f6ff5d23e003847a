"""Developer harnesses and tiny-model builders, not part of the installed package: run them from the checkout root
(`python -m benchmarks.trl_vs_qrm ...`); the tests import `benchmarks.tiny` (pytest's `pythonpath = ["."]`)."""
