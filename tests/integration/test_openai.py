"""The OpenAI-compatible routes against the real server, with the real `openai` SDK as the client:
the same captions as /caption, streaming, the model list, batching with /caption, each refusal in
OpenAI's error shape, and image URLs (off by default; an allow-list with the address checks)."""

from __future__ import annotations

import asyncio
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import openai
import pytest

from support.clients import batch_histogram, post_caption
from support.openai_messages import JPEG, image_message
from tools.servers import bento_server

pytestmark = pytest.mark.slow  # starts the real server


def model_id(server) -> str:
    return httpx.get(f"{server.url}/v1/models").json()["data"][0]["id"]


def sdk(server, **options) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, **options)


@pytest.mark.parametrize("prompt", [None, "a picture of"])
def test_the_sdk_gets_the_caption_that_caption_gives(server, prompt):
    client = sdk(server)
    answer = client.chat.completions.create(model=model_id(server), messages=image_message(text=prompt))
    expected = post_caption(server, files={"file": ("p.jpg", JPEG)}, data={"prompt": prompt} if prompt else None)
    assert answer.choices[0].message.content == expected.json()["caption"]
    assert answer.object == "chat.completion" and answer.model == model_id(server)
    assert answer.choices[0].finish_reason in ("stop", "length")
    assert answer.usage.completion_tokens >= 1 and answer.usage.prompt_tokens >= 1
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + answer.usage.completion_tokens


@pytest.mark.parametrize("name", ["max_tokens", "max_completion_tokens"])
def test_max_tokens_is_max_new_tokens_and_a_cut_caption_says_length(server, name):
    client = sdk(server)
    answer = client.chat.completions.create(model=model_id(server), messages=image_message(), **{name: 2})
    expected = post_caption(server, files={"file": ("p.jpg", JPEG)}, data={"max_new_tokens": "2"}).json()["caption"]
    assert answer.choices[0].message.content == expected
    assert answer.usage.completion_tokens <= 2
    if answer.usage.completion_tokens == 2:  # random weights rarely end a caption within 2 tokens
        assert answer.choices[0].finish_reason == "length"


def test_earlier_and_system_messages_are_accepted_and_not_used(server):
    conversation = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "Send me a picture."},
        *image_message(),
    ]
    answer = sdk(server).chat.completions.create(model=model_id(server), messages=conversation)
    assert answer.choices[0].message.content == post_caption(server, files={"file": ("p.jpg", JPEG)}).json()["caption"]


def test_a_stream_yields_the_same_caption_and_ends_with_done(server):
    client = sdk(server)
    stream = client.chat.completions.create(
        model=model_id(server), messages=image_message(), stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == post_caption(server, files={"file": ("p.jpg", JPEG)}).json()["caption"]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens >= 1
    raw = httpx.post(
        f"{server.url}/v1/chat/completions",
        json={"model": model_id(server), "messages": image_message(), "stream": True},
        timeout=60,
    )
    assert raw.headers["content-type"].startswith("text/event-stream")
    assert raw.text.rstrip().endswith("data: [DONE]")


def test_the_model_list_has_the_served_model(server):
    models = sdk(server).models.list()
    assert [m.id for m in models.data] == [model_id(server)]
    assert models.data[0].object == "model"


def test_sdk_calls_are_batched_with_caption_calls(server):
    before = batch_histogram(server)
    client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    name = model_id(server)

    async def mixed():
        async with httpx.AsyncClient(timeout=60) as http:
            chats = [client.chat.completions.create(model=name, messages=image_message()) for _ in range(8)]
            captions = [http.post(f"{server.url}/caption", files={"file": ("p.jpg", JPEG)}) for _ in range(8)]
            return await asyncio.gather(*chats, *captions)

    answers = asyncio.run(mixed())
    texts = {a.choices[0].message.content for a in answers[:8]} | {a.json()["caption"] for a in answers[8:]}
    assert len(texts) == 1  # one image, one caption, whichever route asked
    after = batch_histogram(server)
    images = after["sum"] - before["sum"]
    batches = after["count"] - before["count"]
    assert images == 16 and batches < 16, (images, batches)


def test_the_sdk_raises_its_own_errors_with_the_servers_message(server):
    client = sdk(server)
    with pytest.raises(openai.BadRequestError, match="sampling is not supported"):
        client.chat.completions.create(model=model_id(server), messages=image_message(), temperature=1.0)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="gpt-4o", messages=image_message())


# Image URLs
class ImageHost:
    """A local HTTP server: /cat.jpg, a redirect to another host, a body over the limit, a slow body."""

    def __init__(self):
        host = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                host.requests.append(self.path)
                if self.path == "/cat.jpg":
                    self.send(JPEG)
                elif self.path == "/elsewhere":
                    self.send_response(302)
                    self.send_header("location", "http://127.0.0.2:1/cat.jpg")
                    self.end_headers()
                elif self.path == "/malformed-redirect":
                    self.send_response(302)
                    self.send_header("location", "http://localhost:99999/cat.jpg")
                    self.end_headers()
                elif self.path == "/huge.jpg":
                    self.send(JPEG + bytes(11 * 1024 * 1024))
                elif self.path == "/slow.jpg":
                    self.send_response(200)
                    self.send_header("content-length", str(len(JPEG)))
                    self.end_headers()
                    for byte in JPEG[:20]:
                        self.wfile.write(bytes([byte]))
                        self.wfile.flush()
                        time.sleep(0.5)
                else:
                    self.send_error(404)

            def send(self, body):
                self.send_response(200)
                self.send_header("content-type", "image/jpeg")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.requests: list[str] = []
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def url(self, path: str) -> str:
        return f"http://localhost:{self.port}{path}"


@pytest.fixture(scope="module")
def image_host():
    host = ImageHost()
    yield host
    host.server.shutdown()


def test_image_urls_are_not_fetched_by_default(server, image_host):
    body = {"model": model_id(server), "messages": image_message(image_host.url("/cat.jpg"))}
    response = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 400 and "data: URL" in response.json()["error"]["message"]
    assert image_host.requests == []


@pytest.fixture(scope="module")
def fetching_server(tiny_model_dir, tmp_path_factory):
    """Fetches from `localhost` (the image host of this module), private addresses allowed."""
    env = {
        "BLIP_MODEL": tiny_model_dir,
        "BLIP_FETCH_URL_HOSTS": "localhost",
        "BLIP_FETCH_ALLOW_PRIVATE": "true",
        "BLIP_FETCH_TIMEOUT_S": "3",
        "BLIP_MAX_READING_BYTES": str(12 * 1024 * 1024),  # room for one fetched 10 MB image at a time
    }
    with bento_server(env, tmp_path_factory.mktemp("fetching") / "bentoml.log") as running:
        yield running


FETCHES = {
    # path: (status, words)
    "/cat.jpg": (200, None),
    "/elsewhere": (400, "only from localhost, not 127.0.0.2"),
    "/huge.jpg": (413, "larger than 10 MB"),
    "/slow.jpg": (400, "within 3 s"),
    "/missing.jpg": (400, "answered 404"),
}


@pytest.mark.parametrize("path", FETCHES)
def test_an_allowed_host_is_fetched_within_the_limits(fetching_server, image_host, path):
    status, words = FETCHES[path]
    body = {"model": model_id(fetching_server), "messages": image_message(image_host.url(path))}
    response = httpx.post(f"{fetching_server.url}/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == status, response.text
    if status == 200:
        expected = post_caption(fetching_server, files={"file": ("p.jpg", JPEG)}).json()["caption"]
        assert response.json()["choices"][0]["message"]["content"] == expected
    else:
        assert words in response.json()["error"]["message"] and response.json()["error"]["param"] == "messages"
    assert httpx.get(f"{fetching_server.url}/readyz").status_code == 200


@pytest.mark.parametrize(
    "url", ["http://localhost:99999/a.jpg", "http://localhost:abc/a.jpg", "http://[::1/a.jpg", "/malformed-redirect"]
)
def test_a_malformed_image_url_is_a_400_naming_it(fetching_server, image_host, url):
    """Before: a 500 (urlsplit's ValueError for a bad port or bracket went unhandled)."""
    url = image_host.url(url) if url.startswith("/") else url
    body = {"model": model_id(fetching_server), "messages": image_message(url)}
    response = httpx.post(f"{fetching_server.url}/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["message"].startswith("the image URL is malformed: 'http://") and error["param"] == "messages"


def test_a_fetched_image_counts_in_the_reading_budget(fetching_server, image_host):
    """Before: fetched bytes were outside the budget (100 fetches of 9.9 MB took an API worker from
    124 to 1,539 MB). Now a fetch reserves BLIP_MAX_UPLOAD_BYTES of it: with a 12 MB budget, a
    second fetch while one is under way is a 503 to retry, and then goes through."""
    import concurrent.futures

    model = model_id(fetching_server)

    def chat(path: str) -> httpx.Response:
        body = {"model": model, "messages": image_message(image_host.url(path))}
        return httpx.post(f"{fetching_server.url}/v1/chat/completions", json=body, timeout=60)

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        slow = pool.submit(chat, "/slow.jpg")  # holds its reservation for BLIP_FETCH_TIMEOUT_S (3 s)
        time.sleep(1)
        busy = chat("/cat.jpg")
        assert slow.result().status_code == 400  # its own timeout
    assert busy.status_code == 503 and busy.headers["retry-after"] == "1", busy.text
    assert "busy reading other uploads" in busy.json()["error"]["message"]
    assert chat("/cat.jpg").status_code == 200  # the reservation went back
    with concurrent.futures.ThreadPoolExecutor(1) as pool:  # a request with no body reserves nothing
        slow = pool.submit(chat, "/slow.jpg")
        time.sleep(1)
        assert httpx.get(f"{fetching_server.url}/v1/models").status_code == 200
        slow.result()


def test_a_host_off_the_list_is_never_asked(fetching_server, image_host):
    seen = len(image_host.requests)
    url = f"http://127.0.0.1:{image_host.port}/cat.jpg"  # the same server, by another name
    body = {"model": model_id(fetching_server), "messages": image_message(url)}
    response = httpx.post(f"{fetching_server.url}/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 400 and "not 127.0.0.1" in response.json()["error"]["message"]
    assert len(image_host.requests) == seen
