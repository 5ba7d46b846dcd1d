"""The model worker (BlipModelService): BLIP on its device, the batcher that feeds it, the compiled
decoder and the device's own JPEG decoding. The only package that imports torch."""
