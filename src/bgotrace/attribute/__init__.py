"""attribute stage of bgotrace."""
