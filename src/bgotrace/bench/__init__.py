"""bench stage of bgotrace."""
