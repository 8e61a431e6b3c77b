"""Ground floor: utilities every stage uses (progress bars, logging set-up)."""
