"""SemFlow in JAX/Flax.

Importing the package does one thing to the process, here and nowhere else: it adds the XLA:CPU
options `runtime.CPU_XLA_FLAGS` to `XLA_FLAGS` (faster convolution gradients on CPUs; nothing
changes on TPUs and GPUs; a value you set yourself wins; semflow_jax/runtime.py says why). Every
other process-wide setting is made by an entry point's `main()`.
"""

from semflow_jax import runtime

runtime.add_cpu_xla_flags()
