"""``hf-residual tune``: search a port's settings (alpha, per-module alpha, merge method) for the best
balance between instruction following and the knowledge the target gained."""
