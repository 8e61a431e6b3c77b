"""corpus stage of bgotrace."""
