"""baselines stage of bgotrace."""
