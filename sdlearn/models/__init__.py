"""Layer 1, the models: networks and their building blocks, and checkpoint I/O.

    layers, attention      ResBlocks, time embedding, up/down sampling; attention and SpatialTransformer
    unet, vae, clip        SD's UNet, AutoencoderKL, CLIP tokenizer and text model (and a TinyCLIP)
    dit                    the diffusion transformer (DiT, adaLN-Zero), diffusers' DiTTransformer2DModel
    autoencoder            the teaching autoencoder and VAE of lessons 01-02
    checkpoint, noise      config and weight I/O shared by every model; noise drawn as diffusers draws it

They import torch, numpy and each other only: no dataset, training loop, sampler or widget.
"""
