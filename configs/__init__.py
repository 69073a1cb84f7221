"""Training recipes: `get_config(arg)` files named with --config=configs/FILE.py[:ARGS]."""
