"""train stage of bgotrace."""
