"""Thin integrations with the stacks people train in.

* :mod:`leafpass.integrations.backend_names`: ``register_backend(name, **options)``, a z3leaf
  backend with options bound under a name of your choice (for tools that only take a name).
* :mod:`leafpass.integrations.accelerate`: accelerate (and transformers' ``Trainer``, which
  builds on it) accepts leafpass's backend names.

Nothing here imports accelerate or transformers when leafpass is imported.
"""
