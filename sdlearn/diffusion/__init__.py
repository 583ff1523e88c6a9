"""Layer 2, diffusion: the noise schedule and the samplers that run it backwards.

    schedules   betas, alpha_bar, q(x_t | x_0), SNR, eps/v/x0 conversions
    samplers    DDPM, DDIM, PLMS, Euler, Euler ancestral, DPM-Solver++(2M); flow Euler
    flow_matching  the straight path x_s = (1 - s) x0 + s noise, its velocity, level sampling and shift

It imports the models layer only (for noise), never the pipeline or the course.
"""
