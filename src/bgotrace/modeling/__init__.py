"""modeling stage of bgotrace."""
