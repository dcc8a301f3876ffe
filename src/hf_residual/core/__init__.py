"""The engine layer: safetensors files in, safetensors files out, exact and streamed.

Tensor files (``safetensors_io``), checkpoints (``checkpoint``, ``fp8``, ``names``, ``sharded``), plans
of engine jobs (``plans``, ``vocab``), the kernels (``kernels``, ``fused``), the streaming engine
(``engine``, its writer/hasher threads in ``writer``), lineage checks (``lineage``), the residual manifest
(``manifest``), staged atomic output (``output``) and the small files beside the weights (``assets``).
Imports only ``errors`` and numpy (numba in ``fused_jit``, which ``fused`` loads on first use); never
transformers, huggingface_hub or torch at import time (``sharded`` imports torch inside its functions).
"""
