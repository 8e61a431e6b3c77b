"""The memory plan: per-stage memory and time of a run from the model's config alone.

:func:`bgotrace.plan.estimate.plan_run` estimates (``bgotrace plan``);
:func:`bgotrace.plan.fit.check_memory` refuses a run that cannot fit, before it loads.
"""
