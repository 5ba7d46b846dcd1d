"""blip_serve/api/fetch.py: the server-side request forgery check, on the address a name resolves to."""

from __future__ import annotations

import asyncio
import ipaddress

import pytest

from blip_serve.api.fetch import FetchRefused, destination
from blip_serve.shared.errors import BadRequest


@pytest.mark.parametrize(
    "address",
    ["127.0.0.1", "10.1.2.3", "192.168.0.9", "169.254.169.254", "::1", "fd00::1", "0.0.0.0", "100.64.0.1"],
)
def test_private_and_local_addresses_are_refused_by_what_the_name_resolves_to(address):
    """The server-side request forgery check, on the resolved address (a DNS name an attacker
    controls may point anywhere): every hop of a fetch, redirects included, goes through it."""

    async def resolver(host, port):
        return [address]

    async def check():
        return await destination("http://images.example.com/a.jpg", frozenset({"images.example.com"}), False, resolver)

    assert not ipaddress.ip_address(address).is_global
    with pytest.raises(FetchRefused, match="private or local address"):
        asyncio.run(check())


def test_a_public_address_passes_and_is_the_one_connected_to():
    async def resolver(host, port):
        return ["93.184.216.34"]

    async def check():
        return await destination("https://images.example.com/a.jpg", frozenset({"images.example.com"}), False, resolver)

    assert asyncio.run(check()) == ("https", "93.184.216.34", 443)
    assert issubclass(FetchRefused, BadRequest)
