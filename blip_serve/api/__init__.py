"""The API worker (CaptionAPI): reading uploads and chat requests, checking limits, fetching image
URLs, calling the model service and answering errors. Never imports torch or transformers."""
