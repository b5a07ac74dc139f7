"""Decoding: greedy and diffusion generation, the MDM's denoising steps, accuracy and common-correct pools."""
