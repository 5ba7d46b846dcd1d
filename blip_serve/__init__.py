"""blip-serve: BLIP image captions over HTTP (service.py), with its client (client.py)."""

__version__ = "0.3.0"  # pyproject.toml says the same (tests/unit/shared/test_settings.py checks)
