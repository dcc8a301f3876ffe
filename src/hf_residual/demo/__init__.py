"""``hf-residual demo``: the paper (Jindal et al. 2024) in miniature, trained on CPU with nothing downloaded.

Modules, one job each: ``world`` (fictional entities, corpora A and B, chat data), ``instructions``
(verifiable format instructions), ``tokenizer``, ``training`` (pre-training, SFT, CPT), ``evaluate``,
``report``, ``cache`` (reuse of built models), ``profiles`` (sizes), ``docchat`` (the derived model of the
paper's Table 4 and its skill task), ``pipeline`` (``run_demo``).
"""

from hf_residual.demo.pipeline import DemoResult, run_demo
from hf_residual.demo.profiles import PROFILES, Profile, get_profile

__all__ = ["PROFILES", "DemoResult", "Profile", "get_profile", "run_demo"]
