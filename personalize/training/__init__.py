"""The pieces of DreamBooth-style training behind `personalize.train.train`: config, prompts, latents,
prior images, objective, checkpoints, outputs and validation samples (one purpose per module)."""
