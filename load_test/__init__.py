"""Load tests for blip-serve: `python -m load_test --help`."""
