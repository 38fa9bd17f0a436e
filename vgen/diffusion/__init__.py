"""Objectives, timestep distributions and samplers: separate pieces sharing one denoiser signature.

A denoiser here is any callable `v = denoiser(x_t, t)` (text conditioning already bound), as in
k-diffusion, so samplers know nothing about networks or text encoders.
"""
