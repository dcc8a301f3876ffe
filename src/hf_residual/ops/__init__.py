"""The operations, one module each: ``extract``, ``apply``, ``port``, ``inspect``.

Each public function takes keyword arguments, packs them once into ``options.Options`` (with
``options.Publish`` for the Hub), and runs its work inside ``common.run`` (destination, progress bars,
publishing). ``checks`` holds the lineage and zero-residual checks run before any arithmetic. The public
names are re-exported by ``hf_residual`` (and ``hf_residual.api``); this package imports core, codecs and
hub, never transformers or torch at import time.
"""
