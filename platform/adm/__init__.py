"""adm: the models of "Diffusion Models Beat GANs on Image Synthesis" (ADM, ADM-G, ADM-U) on Ray."""
__version__ = "0.1.0"
