"""Tokenizer: the scalable multi-scale VQVAE, its quantizer, training loop and perceptual / GAN losses."""
