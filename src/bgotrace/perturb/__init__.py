"""perturb stage of bgotrace."""
