"""Fetching an image URL, for /v1/chat/completions when BLIP_FETCH_URL_HOSTS allows it.

Off by default. When on, only the listed host names are fetched, with the upload size limit, a
time limit for the whole answer, at most a few redirects (each one checked like the first), and
never from a loopback, private, link-local or otherwise non-public address: the check is on the
address the name resolves to, and the connection goes to that same address (no second lookup a
rebinding DNS server could answer differently). That is the server-side request forgery that hit
BentoML's own URL inputs (CVE-2025-54381). BLIP_FETCH_ALLOW_PRIVATE lifts the address check for an
image store on your own network; the host list still applies.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from urllib.parse import urljoin, urlsplit

import httpx

from blip_serve.shared.errors import BadRequest, PayloadTooLarge

MAX_REDIRECTS = 3


class FetchRefused(BadRequest):
    pass


async def resolve(host: str, port: int) -> list[str]:
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [info[4][0] for info in infos]


def public(address: str) -> bool:
    return ipaddress.ip_address(address).is_global


async def destination(url: str, hosts: frozenset[str], allow_private: bool, resolver=resolve) -> tuple[str, str, int]:
    """(scheme, the address to connect to, port) for `url`, or FetchRefused saying why not."""
    try:
        parts = urlsplit(url)
        parts.port  # raises for a port that is no number, or out of range  # noqa: B018
    except ValueError:
        raise FetchRefused(f"the image URL is malformed: {url[:100]!r}", param="messages") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise FetchRefused(f"only http and https image URLs are fetched, not {url[:100]!r}", param="messages")
    host = parts.hostname.lower()
    if host not in hosts:
        raise FetchRefused(
            f"this server fetches images only from {', '.join(sorted(hosts))}, not {host}: "
            "send the image inline as a data: URL",
            param="messages",
        )
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        addresses = await resolver(host, port)
    except OSError:
        raise FetchRefused(f"the image URL's host {host} does not resolve", param="messages") from None
    if not allow_private and not all(public(address) for address in addresses):
        raise FetchRefused(
            f"the image URL's host {host} resolves to a private or local address, which this server does not fetch",
            param="messages",
        )
    return parts.scheme, addresses[0], port


async def fetch_image(
    url: str, hosts: frozenset[str], max_bytes: int, timeout_s: float, allow_private: bool = False, resolver=resolve
) -> bytes:
    """The bytes at `url`: at most `max_bytes` (else 413), all within `timeout_s` (else 400)."""
    try:
        async with asyncio.timeout(timeout_s), httpx.AsyncClient(timeout=timeout_s, follow_redirects=False) as client:
            for _ in range(MAX_REDIRECTS + 1):
                scheme, address, port = await destination(url, hosts, allow_private, resolver)
                parts = urlsplit(url)
                literal = f"[{address}]" if ":" in address else address
                target = parts._replace(netloc=f"{literal}:{port}").geturl()
                request = client.build_request(
                    "GET",
                    target,
                    headers={
                        "Host": parts.netloc.rsplit("@", 1)[-1],
                        "Accept": "image/*",
                        "Accept-Encoding": "identity",
                    },
                    extensions={"sni_hostname": parts.hostname} if scheme == "https" else {},
                )
                response = await client.send(request, stream=True)
                try:
                    if response.is_redirect and "location" in response.headers:
                        url = urljoin(url, response.headers["location"])
                        continue
                    if response.status_code != 200:
                        raise FetchRefused(f"the image URL answered {response.status_code}", param="messages")
                    data = bytearray()
                    async for chunk in response.aiter_raw():
                        data += chunk
                        if len(data) > max_bytes:
                            raise PayloadTooLarge(
                                f"the image at the URL is larger than {max_bytes / 1024 / 1024:g} MB", param="messages"
                            )
                    return bytes(data)
                finally:
                    await response.aclose()
            raise FetchRefused(f"the image URL redirected more than {MAX_REDIRECTS} times", param="messages")
    except TimeoutError:
        raise FetchRefused(f"the image URL did not answer in full within {timeout_s:g} s", param="messages") from None
    except httpx.HTTPError as exc:
        raise FetchRefused(f"the image URL could not be fetched: {type(exc).__name__}", param="messages") from None
