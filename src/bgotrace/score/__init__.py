"""score stage of bgotrace."""
