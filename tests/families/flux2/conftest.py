"""The tiny FLUX.2 [klein] / dev folder fixtures live in tests/conftest.py (the LoRA and recipe tests use them too)."""
