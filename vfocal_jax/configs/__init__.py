"""ml_collections configs: every official Video-FocalNets recipe and the demo (see default.py)."""
