"""Lossy residual codecs: a layer around the exact engine.

``extract --codec lowrank:64`` lets the engine write the exact float32 residual to a temporary folder,
then ``folders.encode_folder`` encodes it tensor by tensor; ``apply``/``port`` of a compressed residual
decode it tensor by tensor (``folders.decoded``) into a temporary float32 residual the engine consumes.
Modules: ``base`` (the interface and spec parsing), ``lowrank``, ``bitdelta``, ``sparse`` (one codec each),
``registry``, ``store`` (safetensors reading/writing one tensor at a time), ``peft_adapter``, ``folders``,
``fidelity``. Importing this package imports neither torch nor transformers.
"""
