"""Central evaluation: frozen encoders compared under identical classifier heads, and the report."""
