"""vfocal_jax: Video-FocalNets (ICCV 2023) in JAX/Flax."""
