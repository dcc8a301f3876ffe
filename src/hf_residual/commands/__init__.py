"""Sub-commands of ``hf-residual``, one module each, registered in this order."""

COMMAND_MODULES = [
    "extract",
    "apply",
    "port",
    "inspect",
    "demo",
    "corpus",
    "cpt",
    "eval_cmd",
    "compare",
    "card",
    "tune",
]
