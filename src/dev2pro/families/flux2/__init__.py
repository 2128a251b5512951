"""FLUX.2 (dev, klein 4B/9B): the second model family."""
