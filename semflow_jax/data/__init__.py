"""Datasets (tfds builders) and the input pipeline. Importing registers the builders."""

from semflow_jax.data import synthetic  # noqa: F401  (registers `synthetic_scenes`)
