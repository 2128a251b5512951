"""The names a config or command line may choose from, in one torch-free module.

The schemas (and so the CLI's parsers and ``--help``) need these lists; the modules that implement them (flow
maths, objectives, samplers, optimizers) import torch. Keeping the lists here lets ``schemas`` be imported
eagerly, and each implementing module imports its list from here, so the two can never disagree.
"""

TIMESTEP_MODES = ("uniform", "sigmoid", "shift", "flux_shift")  # flow.sample_sigmas
OBJECTIVES = ("flow", "cfg_teacher", "guidance_distill")  # objectives.objective_loss
GUIDANCE_MODES = ("auto", "embedded", "true_cfg")  # sampling: embedded guidance input or true CFG
OPTIMIZERS = ("adamw", "adamw8bit", "prodigy", "adafactor", "schedulefree_adamw")  # train.optim.build_optimizer
SCHEDULES = ("constant", "cosine", "linear")  # train.optim.build_scheduler
EXPORT_FORMATS = ("bfl", "diffusers", "fp8")  # dedistill exports
FAMILIES = ("flux1", "flux2")  # families.families(): the model families dev2pro reads and trains
COMPUTE_DTYPES = ("bf16", "fp16", "fp32")
TEXT_DTYPES = ("fp32", "bf16", "fp8")  # text encoders while caching (fp8: FLUX.2's only, train.preflight)
MIXED_PRECISION = ("no", "bf16", "fp16")
LORA_TARGETS = ("attention", "all_linear")  # lora.targets.target_modules presets
LORA_LAYOUTS = ("kohya", "comfy", "diffusers")  # lora.formats: the layouts it writes
CHECKPOINT_LAYOUTS = ("bfl", "comfy", "diffusers")  # flux.checkpoint: the layouts it writes
VRAM_CHOICES = (8, 12, 16, 24, 32, 48, 80)  # model.vram presets in GB (32 and 80: FLUX.2's computed ones)
MAX_REFERENCES = 10  # reference images per edit (FLUX.2 takes up to 10; each adds the image's token count)
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")  # model files that need allow_pickle
# diffusers' attention dispatcher backends that run from installed packages ("" = PyTorch SDPA as diffusers calls it;
# "auto": the fastest that passes a probe with the model on this card, train/attention.py).
# Its "*_hub" backends download kernels from the Hugging Face Hub at run time: dev2pro never fetches, so they are not
# offered (a test keeps this list equal to diffusers' AttentionBackendName minus those).
ATTENTION_BACKENDS = ("", "auto", "native", "_native_flash", "_native_efficient", "_native_cudnn", "_native_math", "flash",
                      "flash_varlen", "_flash_3", "_flash_varlen_3", "flex", "sage", "sage_varlen",
                      "_sage_qk_int8_pv_fp8_cuda", "_sage_qk_int8_pv_fp8_cuda_sm90", "_sage_qk_int8_pv_fp16_cuda",
                      "_sage_qk_int8_pv_fp16_triton", "xformers", "_native_npu", "_native_xla")
