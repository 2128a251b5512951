"""FLUX.2 (dev and [klein] 4B/9B, Base and distilled) on diffusers' own classes.

``family``     the ``families.Family`` entry: detection markers, key tables, sizes, blocks, transformer inputs;
``spec``       sizes and variants, and ``detect`` from tensor shapes (never mistaking a FLUX.1 file for FLUX.2 or
               back);
``keys``       BFL/ComfyUI <-> diffusers transformer key maps, streamable one output tensor at a time;
``lora_keys``  the LoRA layouts FLUX.2 users load (diffusers/PEFT, BFL-key, kohya/musubi), exact conversions;
``latents``    FLUX.2 latents stored so that FLUX.1's 2x2 packing gives FLUX.2's tokens;
``tiny``       tiny random-weight model folders in the real diffusers layouts, built offline (``tiny_dev``: dev's
               Mistral3 text stack);
``text``       the text stacks (klein: Qwen3, dev: Mistral3; three stacked hidden layers) through the pipelines'
               own ``encode_prompt``: embeddings, text ids, the cached bf16 record and the empty-prompt embedding.
"""
