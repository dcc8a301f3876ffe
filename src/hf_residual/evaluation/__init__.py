"""Evaluation: lm-eval suites over models, paper-style comparison tables and plots, eval results in cards.

``runner.evaluate`` (lm-eval per model, results stored by model sha and task settings), ``compare.compare``
(Markdown table, deltas, PNG bar charts), ``card.write_card`` (model-index and table in the model card).
lm_eval and matplotlib are imported only inside the functions that need them.
"""
