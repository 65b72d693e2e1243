"""Regenerate the paper's analyses (Fig. 2-6) on any hooked model: one module per figure.

    python -m analysis.fig2_task_specificity   # Fig. 2: transfer of head sets across tasks
    python -m analysis.fig3_granularity        # Fig. 3: selected heads per layer
    python -m analysis.fig6_head_similarity    # Fig. 6: Jaccard / EMD of head sets
    python -m analysis.fig4_fig5_budget        # Fig. 4 / 5: training data and number of heads
    python -m analysis.tables1_2_baselines     # Tables 1 / 2: baselines and head selectors
    python -m analysis.run_claims              # the paper's claims as tested hypotheses
    python -m analysis.draw_claim_figures      # Fig. 2, 4, 5 with 95% CIs from the claims' cells

Each writes figures (HTML + PNG) and CSV tables to ``--out`` (default
``analysis_out/<module>``). The figure modules cache their runs under ``analysis_out/cache``
(shared: a head selection or cell made by one is reused by the others) and take
``--budget quick|paper|smoke`` (see ``lofit_lens.budgets``).
"""
