"""FLUX.2 (dev and [klein] 4B/9B, Base and distilled) on diffusers' own classes.

``spec``  sizes and variants, and ``detect`` from tensor shapes (never mistaking a FLUX.1 file for FLUX.2 or back);
``keys``  BFL/ComfyUI <-> diffusers transformer key maps, streamable one output tensor at a time;
``tiny``  tiny random-weight model folders in the real diffusers layouts, built offline;
``text``  the klein text stack (Qwen3, three stacked hidden layers) through the pipeline's own ``encode_prompt``.
"""
