"""Tests that spawn several processes running real DeepSpeed ZeRO-3 over gloo on CPU."""
