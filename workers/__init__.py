"""What a job does: validate its inputs, build calibration data, quantize, evaluate.

Heavy libraries (torch, transformers, gptqmodel) are imported inside the functions that need
them, never at module import: the CLI imports `workers.inputs` to reject bad input quickly, and
a Ray actor must import torch only after Ray has pinned its GPU (CUDA_VISIBLE_DEVICES).
"""
