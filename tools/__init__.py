"""Commands beside the server, used by the tests, load_test/ and the README: the tiny-model maker,
the model-store import, sample images, the server harness and a /metrics reader."""
