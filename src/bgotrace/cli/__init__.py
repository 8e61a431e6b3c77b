"""cli stage of bgotrace."""
