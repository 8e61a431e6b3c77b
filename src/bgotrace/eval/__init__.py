"""eval stage of bgotrace."""
