"""dev2pro: train Flux.1 LoRAs the Flux-Dev2Pro way."""
__version__ = "0.1.0"
