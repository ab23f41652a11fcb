"""SemFlow in JAX/Flax.

Importing the package, or any module of it, changes nothing in the process: the entry points
set XLA flags, JAX's platforms and the compilation cache with `runtime.configure_process`
(semflow_jax/runtime.py says what and why).
"""
