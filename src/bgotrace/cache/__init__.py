"""cache stage of bgotrace."""
