"""report stage of bgotrace."""
