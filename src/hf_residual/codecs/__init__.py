"""Lossy residual codecs: a layer around the exact engine.

``extract --codec lowrank:64`` computes the exact float32 residual tensor by tensor from the model files
(``exact``) and ``folders.encode_tensors`` encodes it; ``apply``/``port`` of a compressed residual read it
in the stream (``stream``: a block reader per encoded tensor, inside the engine). No float32 copy is
written either way.
Modules: ``base`` (the interface and spec parsing), ``lowrank``, ``bitdelta``, ``sparse`` (one codec each),
``registry``, ``store`` (safetensors reading/writing one tensor at a time), ``peft_adapter``, ``folders``,
``exact``, ``stream``, ``fidelity``. Importing this package imports neither torch nor transformers.
"""
