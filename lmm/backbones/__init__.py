"""Frozen backbones: vision towers (open_clip, timm via open_clip, HF CLIP/SigLIP) and any HF causal LM."""
