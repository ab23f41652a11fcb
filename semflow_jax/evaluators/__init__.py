"""One evaluator per metric: `semflow_jax/evaluators/<name>.py` defines `Metric`, and
`config.eval.metrics` lists the names that run (common.py holds the protocol they follow)."""
