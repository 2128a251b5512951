"""Model families: what differs between FLUX.1 and FLUX.2 (transformer class and sizes, key maps per file layout,
LoRA layouts, text stack and cached text format, VAE and latent packing, pipeline and guidance semantics, block
lists, plan constants). One sub-package per family plus the registry here."""
