"""The image formats blip-serve accepts, in one place: the server's decoder, its messages and API
document, and the clients that pick files from a folder all read them here (no imports: the CLI
and the notebook load this module without Pillow)."""

# By Pillow's name. Everything else (SVG, PDF, ICO, PSD ...) is refused before Pillow's other
# plugins look at the bytes.
ACCEPTED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
ACCEPTED_TEXT = "JPEG, PNG, WebP, GIF, BMP or TIFF"
# File names a client sends from a folder.
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"})
