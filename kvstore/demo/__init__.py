"""Demos that run a real transformer against kvstore (needs the ``demo`` extra: torch, transformers).

:mod:`kvstore.demo.model` builds the model and converts its KV cache to and from
kvstore's canonical page layout; :mod:`kvstore.demo.pd` runs prefill/decode
disaggregation (``kvstore demo pd``).
"""
