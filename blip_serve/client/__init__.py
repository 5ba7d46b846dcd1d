"""The client: a library (library.py) and the blip-caption command (cli.py), all that `pip install .`
installs. It needs httpx alone."""

from blip_serve.client.cli import main
from blip_serve.client.library import AsyncBlipClient, BlipClient, BlipError, Outcome

__all__ = ["AsyncBlipClient", "BlipClient", "BlipError", "Outcome", "main"]
