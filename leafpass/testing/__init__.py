"""Support code for testing models compiled with leafpass (ours and yours).

Nothing here is needed to use leafpass.

* :mod:`leafpass.testing.models`: small models with ZeRO-3 leaf candidates (data-dependent
  mixture-of-experts blocks, a leaf with many tiny submodules), defined at module level so
  that processes started with ``spawn`` can unpickle them.
* :mod:`leafpass.testing.recording`: ``RecordingRuntime``, which records every
  ``prefetch_all`` call.
* :mod:`leafpass.testing.distributed`: ``run_ranks`` runs a function on N gloo ranks on
  CPU with a hard timeout and DeepSpeed attached without its CPU JIT builds;
  ``zero3_config`` builds a ZeRO-3 config that matches plain torch step for step.
"""
