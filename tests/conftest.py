"""Test set-up: 8 CPU devices for multi-device code, and a hypothesis profile.

`jax_num_cpu_devices` must be set before JAX first touches a backend, which is
why it is here, at collection time, and not in a fixture.
"""

import os

import hypothesis
import jax

os.environ.setdefault("MPLBACKEND", "Agg")
jax.config.update("jax_num_cpu_devices", 8)

# Compilation makes the first example of a JAX property slow: no deadline.
hypothesis.settings.register_profile(
    "mergejax", deadline=None, max_examples=25, derandomize=True
)
hypothesis.settings.load_profile("mergejax")
