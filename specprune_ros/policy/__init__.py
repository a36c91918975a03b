"""VLA policies behind one interface.

``interface`` (what callers see: ``Policy``, ``Observation``, ``ActionSpec``, ``PolicyOutput``), ``errors``,
``backend`` (the contract a model implements: observation -> decoder input, decoder pass -> normalised actions) and
``prunable_policy`` (a backend plus a pruning method as a ``Policy``). The reference VLA is one backend
(``reference_vla``, ``reference_backend``, ``reference_checkpoint``, ``tokenizer``); the published OpenVLA models
are others (``specprune_ros.adapters``); ``specprune_ros.models`` loads any of them by name.
"""
